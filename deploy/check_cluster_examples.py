#!/usr/bin/env python3
"""Static checks of the three-replica examples in deploy/cluster/, used by check.sh.

  check_cluster_examples.py [DIR]        (default: cluster/ beside this file)

Parses compose.yaml, kubernetes.yaml, kustomization.yaml (YAML) and wxgate.toml, and checks
that they agree with each other: three wxgate replicas; the ports the containers, probes,
scrape annotations, Services and nginx use are the ones wxgate.toml listens on; the Redis
they name is the one cluster.redis_url points at; readiness on /readyz and liveness on
/healthz; the cluster secret and Redis's password from the environment (a Secret, or the
shell for compose), never from a file in the repository; the pod's grace period covers the
preStop pause and shutdown_grace_ms. Exits 1 listing every problem.

Needs PyYAML (Debian: python3-yaml) and Python 3.11+ (tomllib).
"""
import os
import re
import sys
import tomllib
import urllib.parse

import yaml

REPLICAS = 3


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "cluster")
    problems = []

    def check(ok, what):
        if not ok:
            problems.append(what)

    def load_yaml(name, many=False):
        with open(os.path.join(root, name)) as f:
            return list(yaml.safe_load_all(f)) if many else yaml.safe_load(f)

    with open(os.path.join(root, "wxgate.toml"), "rb") as f:
        config = tomllib.load(f)
    listen_port = int(config["server"]["listen"].rsplit(":", 1)[1])
    admin_port = int(config["server"]["admin_listen"].rsplit(":", 1)[1])
    grace_ms = config["server"].get("shutdown_grace_ms", 10000)
    cluster = config.get("cluster", {})
    check("secret_file" not in cluster, "wxgate.toml: the cluster secret must come from WXGATE_CLUSTER_SECRET")
    redis = urllib.parse.urlsplit(cluster.get("redis_url", ""))
    check(redis.password is None, "wxgate.toml: no password in redis_url (WXGATE_REDIS_PASSWORD)")
    redis_host, redis_port = redis.hostname, redis.port or 6379

    # --- compose ---
    compose = load_yaml("compose.yaml")
    services = compose.get("services", {})
    wx = services.get("wxgate", {})
    check(wx.get("deploy", {}).get("replicas") == REPLICAS, "compose: wxgate needs deploy.replicas: %d" % REPLICAS)
    check(redis_host in services, "compose: no service %r (cluster.redis_url's host)" % redis_host)
    env = wx.get("environment", {})
    for name in ("WXGATE_CLUSTER_SECRET", "WXGATE_REDIS_PASSWORD"):
        check(str(env.get(name, "")).startswith("${%s:?" % name),
              "compose: wxgate's %s must come from the shell, required (${%s:?...})" % (name, name))
    exposed = {str(p) for p in wx.get("expose", [])}
    check({str(listen_port), str(admin_port)} <= exposed, "compose: wxgate must expose %d and %d" % (listen_port, admin_port))
    for source in compose.get("configs", {}).values():
        check(os.path.exists(os.path.join(root, source["file"])), "compose: config file %s is missing" % source["file"])
    build = wx.get("build", {})
    check(os.path.exists(os.path.join(root, build.get("context", "."), build.get("dockerfile", "Dockerfile"))),
          "compose: wxgate's build.dockerfile does not exist")
    with open(os.path.join(root, "nginx.conf")) as f:
        nginx = f.read()
    check(re.search(r"server\s+wxgate:%d;" % listen_port, nginx) is not None,
          "nginx.conf: the upstream must be wxgate:%d" % listen_port)
    check("keepalive" in nginx and 'proxy_set_header Connection ""' in nginx,
          "nginx.conf: keep-alive to the replicas needs keepalive and an empty Connection header")

    # --- Kubernetes ---
    kustomization = load_yaml("kustomization.yaml")
    docs = [d for d in load_yaml("kubernetes.yaml", many=True) if d]
    for resource in kustomization.get("resources", []):
        check(os.path.exists(os.path.join(root, resource)), "kustomization: %s is missing" % resource)
    generated = {g["name"]: g for g in kustomization.get("configMapGenerator", [])}
    check(generated.get("wxgate-config", {}).get("files") == ["config.toml=wxgate.toml"],
          "kustomization: the wxgate-config ConfigMap must be made of wxgate.toml as config.toml")
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployment = by_kind_name.get(("Deployment", "wxgate"))
    check(deployment is not None, "kubernetes: no Deployment wxgate")
    if deployment:
        spec = deployment["spec"]
        check(spec.get("replicas") == REPLICAS, "kubernetes: Deployment wxgate needs replicas: %d" % REPLICAS)
        pod = spec["template"]
        annotations = pod["metadata"].get("annotations", {})
        check(annotations.get("prometheus.io/scrape") == "true", "kubernetes: prometheus.io/scrape must be \"true\"")
        check(annotations.get("prometheus.io/port") == str(admin_port),
              "kubernetes: prometheus.io/port must be the admin port %d" % admin_port)
        check(annotations.get("prometheus.io/path") == "/metrics", "kubernetes: prometheus.io/path must be /metrics")
        container = pod["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        check(ports == {"proxy": listen_port, "admin": admin_port},
              "kubernetes: container ports must be proxy %d and admin %d, not %s" % (listen_port, admin_port, ports))
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container.get(probe, {}).get("httpGet", {})
            check(get.get("path") == path and get.get("port") in ("admin", admin_port),
                  "kubernetes: %s must GET %s on the admin port" % (probe, path))
        secret_env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", [])}
        for name in ("WXGATE_CLUSTER_SECRET", "WXGATE_REDIS_PASSWORD"):
            check(bool(secret_env.get(name)), "kubernetes: %s must come from a Secret (secretKeyRef)" % name)
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        config_arg = container.get("args", [])
        config_path = config_arg[config_arg.index("--config") + 1] if "--config" in config_arg else ""
        volume = volumes.get(mounts.get(os.path.dirname(config_path), ""), {})
        check(volume.get("configMap", {}).get("name") == "wxgate-config",
              "kubernetes: --config %s must be in the wxgate-config ConfigMap's mount" % config_path)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        check(grace * 1000 > pause * 1000 + grace_ms,
              "kubernetes: terminationGracePeriodSeconds %s must exceed the preStop pause (%d s) + shutdown_grace_ms (%d)"
              % (grace, pause, grace_ms))
    service = by_kind_name.get(("Service", "wxgate"), {})
    check([p.get("targetPort") for p in service.get("spec", {}).get("ports", [])] in (["proxy"], [listen_port]),
          "kubernetes: Service wxgate must target the proxy port")
    redis_service = by_kind_name.get(("Service", redis_host))
    check(redis_service is not None, "kubernetes: no Service %r (cluster.redis_url's host)" % redis_host)
    if redis_service:
        check([p["port"] for p in redis_service["spec"]["ports"]] == [redis_port],
              "kubernetes: Service %s must listen on %d" % (redis_host, redis_port))
    check(("Deployment", redis_host) in by_kind_name, "kubernetes: no Deployment %s" % redis_host)
    check(not any(d["kind"] == "Secret" for d in docs), "kubernetes: no Secret in the repository")

    for p in problems:
        print("deploy/cluster: " + p, file=sys.stderr)
    if problems:
        return 1
    print("deploy/cluster: compose (%d services), kubernetes (%d objects), wxgate.toml, nginx.conf agree"
          % (len(services), len(docs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
