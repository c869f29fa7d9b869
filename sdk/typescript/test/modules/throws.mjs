import { Image } from "@tlimage/sdk";

const settings = {};
export default new Image({ name: "t" })
  .env("KEY", settings.key.trim());
