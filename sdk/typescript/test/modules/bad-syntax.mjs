import { Image } from "@tlimage/sdk";
export default new Image({ name: "t" }).run(["a",;
