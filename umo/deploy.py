"""Deployment of the approved champion to S3 (boto3) or a local folder: verified, atomic, with rollback.

Layout under the target (`s3://bucket/prefix` or a folder):

    <model>/<version>/pytorch_lora_weights.safetensors   the LoRA (diffusers format)
    <model>/<version>/config.json, MODEL_CARD.md
    <model>/<version>/manifest.json                       sha256 and size of every file above
    <model>/current.json                                  THE pointer readers follow: version, path, manifest sha256,
                                                          history of earlier versions (newest first)

Order: every file, then manifest.json, then every object is read back and checked against the manifest by our own
code (moto, like some S3-compatible stores, does not verify checksums), and only then is current.json written, in
one PUT (one rename locally). A failure anywhere before leaves current.json as it was; a re-run uploads again.
Re-deploying the version current.json already points at, when it verifies, does nothing. `rollback` points
current.json back to the newest earlier version, after verifying that version's files.

Only a version holding the registry alias `champion` with the gate's `gate.decision = passed` is deployed.
Credentials come from boto3's standard chain (environment, profile, instance role); the endpoint from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when set. Nothing here logs them. Weights are checked to be safetensors
(header parsed, nothing unpickled) before upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from safetensors import safe_open

from umo.config import DeployConfig, RegistryConfig, TrackingConfig
from umo.io import atomic_write_bytes, sha256_file, shared_path
from umo.registry import CHAMPION, DECISION_TAG, RegistryError, approved_champion, client_for, version_files

log = logging.getLogger(__name__)

POINTER, MANIFEST = "current.json", "manifest.json"
CHUNK = 1 << 20
_BUCKET = re.compile(r"(?!xn--)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9!_.*'()-]+")


class DeployError(RuntimeError):
    """A deployment that must not happen or did not verify; the message says what and where."""


@dataclass
class DeployResult:
    model: str
    version: str
    location: str
    changed: bool  # False: current.json already pointed at this verified version
    pointer: dict[str, Any]


class Store(Protocol):
    location: str

    def put_file(self, key: str, path: Path, sha256: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def read(self, key: str) -> bytes | None: ...

    def digest(self, key: str) -> tuple[int, str] | None: ...

    def abort_incomplete(self, key: str) -> int: ...


# ------------------------------------------------------------------------------------------------ targets


def parse_target(target: str, settings: DeployConfig | None = None, *, s3_client=None) -> Store:
    """`s3://bucket/prefix` -> S3Store (bucket and prefix validated), anything else -> LocalStore (a folder)."""
    if target.startswith("s3://"):
        bucket, _, prefix = target[len("s3://"):].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.fullmatch(bucket) or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
            raise DeployError(f"{target}: {bucket!r} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        if prefix and not all(_PREFIX_PART.fullmatch(p) and p not in (".", "..") for p in prefix.split("/")):
            raise DeployError(f"{target}: prefix {prefix!r} may hold only A-Z a-z 0-9 ! _ . * ' ( ) - and single "
                              "slashes, and no '.' or '..' parts")
        settings = settings or DeployConfig()
        return S3Store(bucket, prefix, client=s3_client, threshold=int(settings.multipart_threshold_mb * 2**20),
                       chunk=int(settings.multipart_chunk_mb * 2**20))
    if "://" in target:
        raise DeployError(f"{target}: unsupported target (s3://bucket/prefix or a local folder)")
    return LocalStore(shared_path(target))


class LocalStore:
    """A folder with the S3 layout; every write is a temporary sibling renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def _path(self, key: str) -> Path:
        """The key's file, confined to the root after resolving symlinks (a key from a pointer is data)."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise DeployError(f"{self.root}: key {key!r} resolves to {path}, outside the deployment root")
        return path

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._path(key).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(key), data)

    def read(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def digest(self, key: str) -> tuple[int, str] | None:
        path = self._path(key)
        return (path.stat().st_size, sha256_file(path)) if path.is_file() else None

    def abort_incomplete(self, key: str) -> int:
        """Remove the temporary files a killed copy left under `key` (`.<name>.tmp`). Returns how many."""
        folder = self._path(key)
        stale = [p for p in folder.rglob(".*.tmp") if p.is_file()] if folder.is_dir() else []
        for p in stale:
            p.unlink()
        return len(stale)


_S3_HINTS = [
    ({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccessDenied", "403"},
     "check the credentials (AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket's policy"),
    ({"NoSuchBucket"}, "check the bucket of deploy.target (it must exist; umo does not create buckets)"),
    ({"PermanentRedirect", "AuthorizationHeaderMalformed"}, "check the bucket's region (AWS_DEFAULT_REGION)"),
]


class S3Store:
    """A bucket prefix through boto3 (multipart from `threshold` bytes, parts of `chunk` bytes)."""

    def __init__(self, bucket: str, prefix: str, *, client=None, threshold: int, chunk: int) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.client = client or boto3.client("s3")
        self.transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunk, use_threads=False)
        self.location = f"s3://{bucket}/{prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _failed(self, what: str, key: str, err: Exception) -> DeployError:
        """A botocore error as ONE line: what failed, on which s3:// key, and what to check."""
        where = f"s3://{self.bucket}/{self._key(key)}"
        code = message = None
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "?")
            message = err.response.get("Error", {}).get("Message", "")
        else:  # boto3's S3UploadFailedError keeps only the text: "... An error occurred (Code) when ...: Message"
            found = re.search(r"An error occurred \((\w+)\) when calling the \w+ operation(?:[^:]*): (.*)$", str(err))
            if found:
                code, message = found.groups()
        if code is not None:
            hint = next((h for codes, h in _S3_HINTS if code in codes), "see the code and message")
            return DeployError(f"S3 {what} {where} failed: {code} ({message}); {hint}")
        if isinstance(err, NoCredentialsError):
            return DeployError(f"S3 {what} {where} failed: no credentials found; set AWS_PROFILE or "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (boto3's standard chain)")
        if isinstance(err, EndpointConnectionError):
            return DeployError(f"S3 {what} {where} failed: cannot reach the endpoint ({err}); check "
                               "AWS_ENDPOINT_URL_S3, the region and the network")
        return DeployError(f"S3 {what} {where} failed: {type(err).__name__}: {err}")

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": sha256}})
        except (BotoCoreError, ClientError, S3UploadFailedError) as err:
            self.abort_incomplete(key, quiet=True)  # parts of a failed multipart upload cost storage until aborted
            raise self._failed("upload of", key, err) from None
        except BaseException:
            self.abort_incomplete(key, quiet=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as err:
            raise self._failed("write of", key, err) from None

    def abort_incomplete(self, key: str, *, quiet: bool = False) -> int:
        """Abort every unfinished multipart upload whose key starts with `key` (under the prefix). Returns how
        many were aborted. quiet: after a failure, best effort (the failure itself is what gets reported)."""
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                 Prefix=self._key(key))
            for page in pages:
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    aborted += 1
        except (BotoCoreError, ClientError) as err:
            if not quiet:
                raise self._failed("abort of unfinished uploads under", key, err) from None
            log.debug("%s", self._failed("abort of unfinished uploads under", key, err))
        return aborted

    def _get(self, key: str):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._failed("read of", key, err) from None
        except BotoCoreError as err:
            raise self._failed("read of", key, err) from None

    def read(self, key: str) -> bytes | None:
        body = self._get(key)
        return None if body is None else body.read()

    def digest(self, key: str) -> tuple[int, str] | None:
        body = self._get(key)
        if body is None:
            return None
        h, size = hashlib.sha256(), 0
        for chunk in iter(lambda: body.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()


# ------------------------------------------------------------------------------------------------ deploy


def deploy(settings: DeployConfig, registry: RegistryConfig, tracking: TrackingConfig, *, version: str | None = None,
           target: str | None = None, s3_client=None) -> DeployResult:
    """Deploy `version` (default: the `champion`) of registry.model_name to `target` (default settings.target)."""
    name = registry.model_name
    client = client_for(tracking)
    try:
        mv = approved_champion(client, name, version)
    except RegistryError as err:
        raise DeployError(str(err)) from err
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    pointer = _read_pointer(store, name)
    if pointer and pointer.get("version") == str(mv.version):
        problems = verify(store, name, str(mv.version))
        if not problems:
            log.info("%s version %s is already deployed to %s and verifies: nothing to do", name, mv.version,
                     store.location)
            return DeployResult(name, str(mv.version), store.location, False, pointer)
        log.warning("%s version %s at %s does not verify (%s): deploying it again", name, mv.version,
                    store.location, "; ".join(problems))

    with tempfile.TemporaryDirectory(prefix="umo-deploy-") as tmp:
        files = version_files(client, name, mv.version, tmp)
        return publish(store, name, str(mv.version), list(files.values()),
                       {"run_id": mv.run_id, "gate": mv.tags.get(DECISION_TAG), "alias": CHAMPION}, pointer)


def publish(store: Store, name: str, version: str, files: list[Path], info: dict[str, Any],
            pointer: dict | None) -> DeployResult:
    """Upload `files` and their manifest to <name>/<version>/, verify every object, then write current.json
    (`pointer`: the current one, whose version goes first in the new history)."""
    root = f"{name}/{version}"
    for path in files:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
    entries = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files}
    manifest = {"model": name, "version": version, "files": entries, **info}
    for path in files:
        log.info("upload %s (%d bytes) to %s/%s", path.name, path.stat().st_size, store.location, root)
        store.put_file(f"{root}/{path.name}", path, entries[path.name]["sha256"])
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    store.put_bytes(f"{root}/{MANIFEST}", manifest_bytes)
    problems = verify(store, name, version, expected=manifest_bytes)
    if problems:
        raise DeployError(f"{store.location}/{root}: read-back verification failed, current.json unchanged: "
                          + "; ".join(problems))
    history = [] if not pointer else [pointer["version"], *pointer.get("history", [])]
    new = {"model": name, "version": version, "path": root, "manifest": f"{root}/{MANIFEST}",
           "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "deployed_at": _now(),
           "history": [v for v in history if v != version]}
    store.put_bytes(f"{name}/{POINTER}", (json.dumps(new, indent=2) + "\n").encode())
    log.info("deployed %s version %s to %s (current.json written)", name, version, store.location)
    return DeployResult(name, version, store.location, True, new)


def rollback(settings: DeployConfig, name: str, *, target: str | None = None, s3_client=None) -> DeployResult:
    """Point model `name`'s current.json back at the newest earlier deployed version (verified first)."""
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    pointer = _read_pointer(store, name)
    if not pointer or not pointer.get("history"):
        raise DeployError(f"{store.location}/{name}: nothing to roll back to (no earlier deployment recorded)")
    previous, rest = pointer["history"][0], pointer["history"][1:]
    problems = verify(store, name, previous)
    if problems:
        raise DeployError(f"{store.location}/{name}/{previous}: cannot roll back, it does not verify: "
                          + "; ".join(problems))
    manifest_bytes = store.read(f"{name}/{previous}/{MANIFEST}") or b""
    new = {"model": name, "version": previous, "path": f"{name}/{previous}", "manifest": f"{name}/{previous}/{MANIFEST}",
           "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "deployed_at": _now(), "history": rest,
           "rolled_back_from": pointer["version"]}
    store.put_bytes(f"{name}/{POINTER}", (json.dumps(new, indent=2) + "\n").encode())
    log.info("%s: current.json now points at version %s (rolled back from %s)", name, previous, pointer["version"])
    return DeployResult(name, previous, store.location, True, new)


def clean_incomplete(settings: DeployConfig, name: str, *, target: str | None = None, s3_client=None) -> int:
    """Abort the unfinished uploads (S3 multipart, or a folder's temporaries) a killed deploy left under model
    `name`'s prefix; what current.json points at is untouched (its objects are complete). Returns how many."""
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    n = store.abort_incomplete(f"{name}/")
    log.info("%s/%s: %d unfinished upload(s) removed", store.location, name, n)
    return n


def verify(store: Store, name: str, version: str, *, expected: bytes | None = None) -> list[str]:
    """Every problem of a deployed version: manifest missing or changed, a file missing, of another size or
    sha256. Each object is read back in full (empty list: it verifies)."""
    root = f"{name}/{version}"
    raw = store.read(f"{root}/{MANIFEST}")
    if raw is None:
        return [f"{root}/{MANIFEST} missing"]
    if expected is not None and raw != expected:
        return [f"{root}/{MANIFEST} differs from what was written"]
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{root}/{MANIFEST} is not a deployment manifest"]
    problems = []
    for file, meta in sorted(files.items()):
        got = store.digest(f"{root}/{file}")
        if got is None:
            problems.append(f"{root}/{file} missing")
        elif got != (meta["size"], meta["sha256"]):
            problems.append(f"{root}/{file}: size {got[0]} sha256 {got[1][:12]}… but the manifest says size "
                            f"{meta['size']} sha256 {meta['sha256'][:12]}…")
    return problems


def verify_current(settings: DeployConfig, name: str, *, target: str | None = None, s3_client=None) -> DeployResult:
    """What model `name`'s current.json points at, verified; DeployError listing every problem otherwise."""
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    pointer = _read_pointer(store, name)
    if not pointer:
        raise DeployError(f"{store.location}/{name}/{POINTER}: nothing deployed")
    problems = verify(store, name, pointer["version"])
    manifest = store.read(pointer["manifest"]) or b""
    if hashlib.sha256(manifest).hexdigest() != pointer.get("manifest_sha256"):
        problems.append(f"{pointer['manifest']}: not the manifest current.json was written for")
    if problems:
        raise DeployError(f"{store.location}/{name} version {pointer['version']} does not verify: "
                          + "; ".join(problems))
    return DeployResult(name, pointer["version"], store.location, False, pointer)


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise DeployError(f"{path}: a safetensors file without tensors")
    except DeployError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise DeployError(f"{path}: not a readable safetensors file: {err}") from err


_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")  # MLflow's are integers; never a path


def _read_pointer(store: Store, name: str) -> dict | None:
    """current.json, with every version it names (version, history) checked to be a version, not a path, and its
    manifest field the version's own; a DeployError names the file and the field otherwise."""
    pointer = _read_json(store, f"{name}/{POINTER}")
    if pointer is None:
        return None
    where = f"{store.location}/{name}/{POINTER}"
    history = pointer.get("history", []) if isinstance(pointer, dict) else None
    if not isinstance(history, list):
        raise DeployError(f"{where}: not a deployment pointer (expected an object with a history list)")
    for field, value in [("version", pointer.get("version")), *((f"history[{k}]", v) for k, v in enumerate(history))]:
        if not isinstance(value, str) or not _VERSION.fullmatch(value) or ".." in value:
            raise DeployError(f"{where}: {field} {value!r} is not a version (a path there could lead outside "
                              f"{store.location}/{name}); fix the file by hand")
    if pointer.get("manifest", f"{name}/{pointer['version']}/{MANIFEST}") != f"{name}/{pointer['version']}/{MANIFEST}":
        raise DeployError(f"{where}: manifest {pointer['manifest']!r} is not {name}/{pointer['version']}/{MANIFEST}")
    return pointer


def _read_json(store: Store, key: str) -> dict | None:
    raw = store.read(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as err:
        raise DeployError(f"{store.location}/{key}: not JSON ({err}); fix or remove it by hand") from err


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
