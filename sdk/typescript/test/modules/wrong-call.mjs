import { Image } from "@tlimage/sdk";

export default new Image({ name: "w" })
  .run("make", { nework: "none" });
