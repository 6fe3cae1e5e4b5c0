"""The deployment files validate offline: the Kubernetes manifests against the schemas the
``kubernetes-validate`` package ships (strict: unknown fields fail), the compose file as YAML
whose services fit together, and every ``modelreg`` command in them against the real parsers.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.command_lines import check_modelreg_command

ROOT = Path(__file__).parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose"
KUBERNETES_VERSION = "1.30"
"""The oldest Kubernetes the manifests are written for (gRPC probes are GA since 1.27)."""


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(f"{path.name}:{d['kind']}/{d['metadata']['name']}", d)
                     for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


MANIFESTS = _manifests()


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in MANIFESTS if d["kind"] == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    return found


def _containers() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['metadata']['name']}/{c['name']}", c)
            for d in _by_kind("Deployment") + _by_kind("StatefulSet")
            for c in d["spec"]["template"]["spec"]["containers"]]


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return loaded


def _modelreg_commands() -> list[Any]:
    """Every `modelreg` command of both deployments, as pytest params."""
    found = [("kubernetes", name, c["command"], {e["name"]: "x" for e in c.get("env", [])})
             for name, c in _containers() if c["command"][0] == "modelreg"]
    found += [("compose", name, s["command"], s.get("environment", {}))
              for name, s in _compose()["services"].items() if s["command"][0] == "modelreg"]
    return [pytest.param(where, argv, env, id=f"{where}:{name}")
            for where, name, argv, env in found]


class TestKubernetesManifests:
    @pytest.mark.parametrize("manifest", [d for _, d in MANIFESTS],
                             ids=[name for name, _ in MANIFESTS])
    def test_each_manifest_matches_the_kubernetes_schema(self, manifest: dict[str, Any]) -> None:
        """Every object is valid for Kubernetes 1.30, with no field the schema lacks."""
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)

    def test_the_kustomization_lists_every_manifest(self) -> None:
        """`kubectl apply -k` applies every manifest file of the directory."""
        kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
        files = sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
        assert sorted(kustomization["resources"]) == files

    def test_etcd_is_three_members_behind_a_headless_service_and_a_budget(self) -> None:
        """The etcd StatefulSet runs 3 members named through a headless Service, and a
        PodDisruptionBudget keeps 2 of them (the quorum) through voluntary disruptions.
        """
        etcd = _one("StatefulSet", "etcd")
        assert etcd["spec"]["replicas"] == 3
        service = _one("Service", etcd["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        pods = etcd["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pods.items()
        [budget] = _by_kind("PodDisruptionBudget")
        assert budget["spec"]["minAvailable"] == 2
        assert budget["spec"]["selector"]["matchLabels"].items() <= pods.items()
        members = [f"etcd-{i}.etcd:2379" for i in range(3)]
        server = _one("Deployment", "modelreg-server")["spec"]["template"]["spec"]
        assert f"--etcd={','.join(members)}" in server["containers"][0]["command"]

    def test_servers_have_grpc_probes_and_resource_requests_behind_a_service(self) -> None:
        """The server's readiness and startup probes are gRPC health checks on its gRPC port;
        it requests CPU and memory; the Service's selector reaches its pods.
        """
        server = _one("Deployment", "modelreg-server")
        [container] = server["spec"]["template"]["spec"]["containers"]
        listen = next(a for a in container["command"] if a.startswith("--listen="))
        port = int(listen.rpartition(":")[2])
        for probe in ("readinessProbe", "startupProbe"):
            assert container[probe]["grpc"]["port"] == port
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        service = _one("Service", "modelreg")
        pods = server["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pods.items()
        assert port in [p.get("targetPort") == "grpc" and p["port"] for p in
                        service["spec"]["ports"]]

    def test_two_replicators_in_the_servers_region(self) -> None:
        """The replicator runs two replicas, for the region the servers serve."""
        replicator = _one("Deployment", "modelreg-replicator")
        assert replicator["spec"]["replicas"] == 2
        [container] = replicator["spec"]["template"]["spec"]["containers"]
        [server] = _one("Deployment", "modelreg-server")["spec"]["template"]["spec"]["containers"]
        assert "--region=eu" in container["command"] and "--region=eu" in server["command"]

    def test_the_topology_config_map_is_toml_naming_this_region(self) -> None:
        """The topology the servers mount parses, names the primary, and lists this region
        with the etcd endpoints the servers use.
        """
        topology = tomllib.loads(_one("ConfigMap", "modelreg-topology")["data"]["topology.toml"])
        assert topology["primary"] in topology["regions"]
        assert topology["regions"]["eu"]["etcd"] == [f"etcd-{i}.etcd:2379" for i in range(3)]


class TestComposeFile:
    def test_three_regions_with_a_replicator_in_each_but_the_primary(self) -> None:
        """The compose file has per region an etcd and a server, and replicators in eu and ap
        (reading the primary's etcd), matching its topology file.
        """
        services = _compose()["services"]
        topology = tomllib.loads((COMPOSE / "topology.toml").read_text())
        regions = list(topology["regions"])
        assert regions == ["us", "eu", "ap"] and topology["primary"] == "us"
        for region in regions:
            assert f"etcd-{region}" in services and f"server-{region}" in services
            assert topology["regions"][region] == {"etcd": [f"etcd-{region}:2379"],
                                                   "servers": [f"server-{region}:50051"]}
        replicators = sorted(name for name in services if name.startswith("replicator-"))
        assert replicators == ["replicator-ap", "replicator-eu"]
        for name in replicators:
            assert "--primary=etcd-us:2379" in services[name]["command"]

    def test_references_resolve(self) -> None:
        """Every dependency names a service, every named volume is declared, every mounted
        file and the image's Dockerfile exist.
        """
        compose = _compose()
        services = compose["services"]
        for name, service in services.items():
            assert set(service.get("depends_on", {})) <= set(services), name
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (COMPOSE / source).is_file(), volume
                else:
                    assert source in compose["volumes"], volume
            build = service.get("build")
            if build:
                assert (COMPOSE / build["context"] / build["dockerfile"]).is_file()
        published = [p for s in services.values() for p in s.get("ports", [])]
        assert len(published) == len(set(published)) == 3


class TestModelregCommands:
    @pytest.mark.parametrize(("where", "argv", "env"), _modelreg_commands())
    def test_every_modelreg_command_is_accepted(
        self, where: str, argv: list[str], env: dict[str, str], tmp_path: Path
    ) -> None:
        """Each `modelreg` command line in the deployments parses with the real command's
        parser, and its settings pass the process's own config validation (the topology file
        it mounts included).
        """
        mounted = COMPOSE / "topology.toml"
        if where == "kubernetes":
            mounted = tmp_path / "topology.toml"
            mounted.write_text(_one("ConfigMap", "modelreg-topology")["data"]["topology.toml"])
        check_modelreg_command(argv, env, {"/etc/modelreg/topology.toml": mounted})
