import { Image } from "@tlimage/sdk";

export interface Service { name: string; port: number }

export function service(s: Service): Image {
  return new Image({ name: s.name })
    .aptInstall("curl")
    .expose(s.port);
}
