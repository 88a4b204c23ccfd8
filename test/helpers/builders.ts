/** Small builders for pure tests: policy().service("svc-web", 2001).allow("api.example.test:443"). */
import type { CompileInput, ServiceInput } from "../../rules/compile.ts";
import { validateService, type ServicePolicy } from "../../rules/policy.ts";
import { parseTarget } from "../../rules/target.ts";

export class ServiceBuilder {
  constructor(
    private readonly parent: PolicyBuilder,
    readonly input: ServiceInput,
  ) {}

  allow(...targets: string[]): this {
    for (const t of targets) {
      const r = parseTarget(t);
      if ("error" in r) throw new Error(r.error);
      this.input.policy.outbound.push(r);
    }
    return this;
  }

  set(patch: Partial<ServicePolicy>): this {
    Object.assign(this.input.policy, patch);
    return this;
  }

  gid(gid: number): this {
    this.input.gid = gid;
    return this;
  }

  /** DNS-aware, its proxy listening on `port`. */
  proxy(port: number): this {
    this.input.policy.dns = "proxy";
    this.input.proxyPort = port;
    return this;
  }

  service(name: string, uid: number): ServiceBuilder {
    return this.parent.service(name, uid);
  }

  resolve(name: string, ...addresses: string[]): PolicyBuilder {
    return this.parent.resolve(name, ...addresses);
  }

  build(): CompileInput {
    return this.parent.build();
  }
}

export class PolicyBuilder {
  private readonly services: ServiceInput[] = [];
  private readonly resolutions = new Map<string, string[]>();
  private resolvers: CompileInput["resolvers"] = [{ address: "127.0.0.53", family: 4, port: 53 }];

  service(name: string, uid: number): ServiceBuilder {
    const s: ServiceInput = { policy: validateService({ name, user: uid }, "builder"), uid };
    this.services.push(s);
    return new ServiceBuilder(this, s);
  }

  resolve(name: string, ...addresses: string[]): this {
    this.resolutions.set(name, addresses);
    return this;
  }

  withResolvers(r: CompileInput["resolvers"]): this {
    this.resolvers = r;
    return this;
  }

  build(): CompileInput {
    return {
      table: "egressd",
      resolvers: this.resolvers,
      services: this.services,
      resolutions: this.resolutions,
    };
  }
}

export const policy = () => new PolicyBuilder();
