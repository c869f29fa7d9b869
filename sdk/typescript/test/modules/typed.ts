import type { Image } from "@tlimage/sdk";
import { service } from "./helper.js";

enum Port { Http = 8080 }

const api: Image = service({ name: "api", port: Port.Http })
  .cmd(["node", "server.js"]);

export default api;
