import { Image } from "@tlimage/sdk";
const x: number = ;
export default new Image();
