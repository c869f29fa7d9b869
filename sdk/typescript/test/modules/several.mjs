import { Image } from "@tlimage/sdk";

const base = new Image({ name: "base" }).run("echo base");
export const worker = base.run("echo worker");
export const alias = worker;
export const both = [new Image({ name: "x" }), worker];
export const notAnImage = { name: "nope" };
export default new Image({ name: "main" }).run("echo main");
console.log("a log line that must not reach the JSON");
