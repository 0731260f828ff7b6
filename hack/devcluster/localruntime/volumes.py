"""Volumes: a hostPath provisioner for the ``local-path`` class, and local folders for a pod's volumes."""

from __future__ import annotations

import base64
import contextlib
import shutil
import threading
from pathlib import Path

from kubernetes import client

from devcluster.localruntime.kube import Obj, call, is_not_found, list_items, read_or_none, watch_forever
from devcluster.localruntime.log import event
from devcluster.localruntime.spec import ObjectSource, SpecError, field_value, resource_value

PROVISIONER = "vllm-operator.io/local-path"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
SELECTED_NODE = "volume.kubernetes.io/selected-node"


class VolumeNotReady(Exception):
    """A volume cannot be set up yet (for instance its claim is unbound); the pod waits and retries."""


class Provisioner:
    """Creates a pre-bound hostPath PV for every pending claim of a class served by ``PROVISIONER``."""

    def __init__(self, api: client.ApiClient, state_dir: Path, stop: threading.Event) -> None:
        self.core = client.CoreV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.root = state_dir / "volumes"
        self.stop = stop
        # Each volume's hostPath, by volume name, as the volumes' watch last showed it. Reading them from
        # here, not a LIST per released volume, keeps deleting a fleet's 5,000 volumes linear: the LIST made
        # it 0.27 s a volume and kept the apiserver busy for twenty minutes after a benchmark.
        self._paths: dict[str, str | None] = {}

    def run_claims(self) -> None:
        watch_forever("persistentvolumeclaims", self.core.list_persistent_volume_claim_for_all_namespaces,
                      self._claims, self._claim_changed, self.stop)

    def run_volumes(self) -> None:
        watch_forever("persistentvolumes", self.core.list_persistent_volume,
                      self._volumes, self._volume_changed, self.stop)

    def _claims(self, claims: list[Obj]) -> None:
        for claim in claims:
            self._claim_changed("ADDED", claim)

    def _volumes(self, volumes: list[Obj]) -> None:
        self._paths = {volume["metadata"]["name"]: _host_path(volume) for volume in volumes}
        for volume in volumes:
            self._volume_changed("ADDED", volume)

    def _claim_changed(self, kind: str, claim: Obj) -> None:
        spec = claim["spec"]
        if kind == "DELETED" or spec.get("volumeName") or claim.get("metadata", {}).get("deletionTimestamp"):
            return
        class_name = spec.get("storageClassName")
        storage_class = read_or_none(self.storage.read_storage_class, class_name) if class_name else None
        if storage_class is None or storage_class.get("provisioner") != PROVISIONER:
            return
        metadata = claim["metadata"]
        if (storage_class.get("volumeBindingMode") == "WaitForFirstConsumer"
                and SELECTED_NODE not in metadata.get("annotations", {})):
            return  # the scheduler picks a node first; it then annotates the claim
        folder = self.root / metadata["namespace"] / metadata["name"]
        folder.mkdir(parents=True, exist_ok=True)
        volume: Obj = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"pvc-{metadata['uid']}", "annotations": {PROVISIONED_BY: PROVISIONER}},
            "spec": {
                "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "persistentVolumeReclaimPolicy": storage_class.get("reclaimPolicy", "Delete"),
                "storageClassName": class_name,
                "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": metadata["namespace"],
                             "name": metadata["name"], "uid": metadata["uid"]},
            },
        }
        try:
            call(self.core.create_persistent_volume, volume)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            return
        event("volume.provisioned", claim=f"{metadata['namespace']}/{metadata['name']}",
              volume=volume["metadata"]["name"], path=str(folder))

    def _volume_changed(self, kind: str, volume: Obj) -> None:
        annotations = volume["metadata"].get("annotations", {})
        spec = volume["spec"]
        if kind == "DELETED":
            self._paths.pop(volume["metadata"]["name"], None)
        else:
            self._paths[volume["metadata"]["name"]] = _host_path(volume)
        if (kind == "DELETED" or volume["metadata"].get("deletionTimestamp")
                or annotations.get(PROVISIONED_BY) != PROVISIONER
                or volume.get("status", {}).get("phase") != "Released"
                or spec.get("persistentVolumeReclaimPolicy") != "Delete"):
            return
        name = volume["metadata"]["name"]
        folder = Path(spec["hostPath"]["path"])
        # A new claim of the same name reuses the folder; its data must survive the old volume. Its volume may
        # not have reached the watch yet, so the claim itself is asked for.
        claim = spec.get("claimRef") or {}
        again = read_or_none(self.core.read_namespaced_persistent_volume_claim, claim.get("name"),
                             claim.get("namespace")) if claim.get("name") and claim.get("namespace") else None
        shared = (again is not None and again["metadata"]["uid"] != claim.get("uid")) or any(
            other != name and path == str(folder) for other, path in self._paths.items())
        if folder.is_relative_to(self.root) and not shared:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()  # the namespace's folder, once its last volume is gone
        try:
            call(self.core.delete_persistent_volume, name)
        except client.ApiException as exc:
            if not is_not_found(exc):
                raise
            return  # an earlier event already removed it
        event("volume.deleted", volume=name, path=str(folder), folder_kept=shared)


class ApiObjects(ObjectSource):
    """Secrets and ConfigMaps of one namespace, read from the API server."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core = core
        self.namespace = namespace

    def secret(self, name: str) -> dict[str, bytes] | None:
        found = read_or_none(self.core.read_namespaced_secret, name, self.namespace)
        if found is None:
            return None
        return {key: base64.b64decode(value) for key, value in (found.get("data") or {}).items()}

    def config_map(self, name: str) -> dict[str, bytes] | None:
        found = read_or_none(self.core.read_namespaced_config_map, name, self.namespace)
        if found is None:
            return None
        data = {key: value.encode() for key, value in (found.get("data") or {}).items()}
        data.update({key: base64.b64decode(value) for key, value in (found.get("binaryData") or {}).items()})
        return data

    def service_address(self, namespace: str, name: str, port: int) -> str | None:
        service = read_or_none(self.core.read_namespaced_service, name, namespace)
        spec = (service or {}).get("spec") or {}
        entry = next((p for p in spec.get("ports") or [] if p.get("port") == port), None)
        if entry is None or not spec.get("selector"):
            return None
        selector = ",".join(f"{key}={value}" for key, value in spec["selector"].items())
        pods, _ = list_items(self.core.list_namespaced_pod, namespace=namespace, label_selector=selector)
        for pod in pods:
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            if not ready or not status.get("podIP") or pod["metadata"].get("deletionTimestamp"):
                continue
            target = entry.get("targetPort", port)
            if isinstance(target, str):  # a named port of the Pod's containers
                named = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []
                         if p.get("name") == target]
                if not named:
                    continue
                target = named[0]
            return f"{status['podIP']}:{target}"
        return None


def _write_files(folder: Path, files: dict[str, bytes], modes: dict[str, int]) -> None:
    for relative, content in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(modes.get(relative, 0o644))


def _key_files(data: dict[str, bytes] | None, source: Obj, what: str) -> tuple[dict[str, bytes], dict[str, int]]:
    """The files of a secret/configMap volume source: every key, or just its ``items``."""
    if data is None:
        if source.get("optional", False):
            return {}, {}
        raise VolumeNotReady(f"{what} not found")
    mode: int = source.get("defaultMode", 0o644)
    if "items" not in source:
        return dict(data), dict.fromkeys(data, mode)
    files: dict[str, bytes] = {}
    modes: dict[str, int] = {}
    for item in source["items"]:
        if item["key"] not in data:
            raise VolumeNotReady(f"key {item['key']} missing from {what}")
        files[item["path"]] = data[item["key"]]
        modes[item["path"]] = item.get("mode", mode)
    return files, modes


class PodVolumes:
    """Local folders standing in for one pod's volumes, under ``<pod dir>/volumes/<name>``."""

    def __init__(self, core: client.CoreV1Api, pod: Obj, pod_dir: Path, pod_ip: str) -> None:
        self.core = core
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.folder = pod_dir / "volumes"
        self.pod_ip = pod_ip
        self.objects = ApiObjects(core, self.namespace)

    def materialize(self) -> dict[str, Path]:
        """Volume name -> local folder; raises VolumeNotReady while something is missing."""
        return {volume["name"]: self._volume(volume) for volume in self.pod["spec"].get("volumes", [])}

    def _volume(self, volume: Obj) -> Path:
        target: Path = self.folder / volume["name"]
        if "persistentVolumeClaim" in volume:
            return self._claim_folder(volume["persistentVolumeClaim"]["claimName"])
        if "hostPath" in volume:
            path = Path(str(volume["hostPath"]["path"]))
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            return path
        target.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            source = volume["secret"]
            _write_files(target, *_key_files(self.objects.secret(source["secretName"]), source,
                                             f"secret {source['secretName']}"))
        elif "configMap" in volume:
            source = volume["configMap"]
            _write_files(target, *_key_files(self.objects.config_map(source["name"]), source,
                                             f"configmap {source['name']}"))
        elif "downwardAPI" in volume:
            _write_files(target, *self._downward(volume["downwardAPI"]))
        elif "projected" in volume:
            self._projected(volume["projected"], target)
        elif "emptyDir" not in volume:
            event("volume.unsupported", "warning", pod=self._pod_name(), volume=volume["name"],
                  note="mounted as an empty folder")
        return target

    def _pod_name(self) -> str:
        return f"{self.namespace}/{self.pod['metadata']['name']}"

    def _claim_folder(self, claim_name: str) -> Path:
        claim = read_or_none(self.core.read_namespaced_persistent_volume_claim, claim_name, self.namespace)
        if claim is None:
            raise VolumeNotReady(f"persistentvolumeclaim {claim_name} not found")
        volume_name = claim["spec"].get("volumeName")
        if not volume_name or claim.get("status", {}).get("phase") != "Bound":
            raise VolumeNotReady(f"persistentvolumeclaim {claim_name} is not bound yet")
        volume = call(self.core.read_persistent_volume, volume_name)["spec"]
        local = (volume.get("hostPath") or volume.get("local") or {}).get("path")
        if local is None:
            raise VolumeNotReady(f"persistentvolume {volume_name} has no local path")
        Path(local).mkdir(parents=True, exist_ok=True)
        return Path(local)

    def _downward(self, source: Obj) -> tuple[dict[str, bytes], dict[str, int]]:
        files: dict[str, bytes] = {}
        modes: dict[str, int] = {}
        for item in source.get("items", []):
            if "fieldRef" in item:
                value = field_value(self.pod, self.pod_ip, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                container = next(c for c in self.pod["spec"]["containers"] if c["name"] == ref.get("containerName"))
                value = resource_value(container, ref["resource"], ref.get("divisor"))
            files[item["path"]] = value.encode()
            modes[item["path"]] = item.get("mode", source.get("defaultMode", 0o644))
        return files, modes

    def _projected(self, projected: Obj, target: Path) -> None:
        # Missing sources are skipped: the automatic API-access volume must not block a playground pod.
        for source in projected.get("sources", []):
            try:
                if "secret" in source:
                    name = source["secret"]["name"]
                    _write_files(target, *_key_files(self.objects.secret(name), source["secret"], f"secret {name}"))
                elif "configMap" in source:
                    name = source["configMap"]["name"]
                    _write_files(target, *_key_files(self.objects.config_map(name), source["configMap"],
                                                     f"configmap {name}"))
                elif "downwardAPI" in source:
                    _write_files(target, *self._downward(source["downwardAPI"]))
                elif "serviceAccountToken" in source:
                    _write_files(target, *self._token(source["serviceAccountToken"]))
            except (VolumeNotReady, SpecError, client.ApiException) as exc:
                event("volume.projection_skipped", "warning", pod=self._pod_name(), error=str(exc).splitlines()[0])

    def _token(self, source: Obj) -> tuple[dict[str, bytes], dict[str, int]]:
        account = self.pod["spec"].get("serviceAccountName", "default")
        spec: Obj = {"expirationSeconds": source.get("expirationSeconds", 3600)}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        token: str = call(self.core.create_namespaced_service_account_token, account, self.namespace,
                          request)["status"]["token"]
        return {source["path"]: token.encode()}, {source["path"]: 0o600}


def _host_path(volume: Obj) -> str | None:
    return (volume["spec"].get("hostPath") or {}).get("path")
