"""Deployment of the approved champion to S3 (boto3) or a local folder: verified, atomic, with rollback.

Layout under the target (`s3://bucket/prefix` or a folder):

    <model>/<version>/pytorch_lora_weights.safetensors   the LoRA (diffusers format)
    <model>/<version>/config.json, MODEL_CARD.md
    <model>/<version>/manifest.json                       sha256 and size of every file above
    <model>/current.json                                  THE pointer readers follow: version, path, manifest sha256,
                                                          how each file was verified, earlier versions (newest first)

Order: manifest.json first, created only where none exists (it claims the version: a version folder is
immutable, the same bytes again resume or repair it, other bytes are refused); then every file not already
there and verified; then every object is checked against the manifest; only then is current.json written, in
one conditional PUT (one locked rename in a folder) that succeeds only if current.json is still what this run
read, so of two concurrent deployers exactly one moves it. A failure anywhere leaves current.json as it was.
Re-deploying the version current.json already points at, when it verifies, does nothing. `rollback` points
current.json back to the newest earlier version, after verifying that version's files, the same conditional way.

Verification (`check`): every S3 write asks S3 for a SHA-256 checksum (ChecksumAlgorithm SHA256, which S3
checks against the bytes it received); a HEAD with ChecksumMode ENABLED then compares S3's ChecksumSHA256 with
the manifest's sha256 without reading the object (`s3-checksum-sha256`). A multipart object's checksum is a
checksum of its parts' checksums: it is compared with the same composite of the local file where one is at hand
(during a deploy), otherwise the object is read back in full and hashed (`read-back-sha256`), as it is on stores
that keep no checksum and in a folder. The method used for each file is logged and recorded in current.json.

Only a version holding the registry alias `champion` with the gate's `gate.decision = passed` is deployed.
Credentials come from boto3's standard chain (environment, profile, instance role); the endpoint from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when set. Nothing here logs them. Requests use botocore's standard retry
mode (`deploy.max_attempts` attempts each). Weights are checked to be safetensors (header parsed, nothing
unpickled) before upload.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from safetensors import safe_open

from umo.config import DeployConfig, RegistryConfig, TrackingConfig
from umo.io import sha256_file, shared_path

log = logging.getLogger(__name__)

POINTER, MANIFEST = "current.json", "manifest.json"
S3_CHECKSUM, READ_BACK = "s3-checksum-sha256", "read-back-sha256"  # how a file was verified (`verified_by`)
CHUNK = 1 << 20
_BUCKET = re.compile(r"(?!xn--)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9!_.*'()-]+")


class DeployError(RuntimeError):
    """A deployment that must not happen or did not verify; the message says what and where."""


class Conflict(DeployError):
    """A conditional write was refused: the key was not in the state the writer expected (it exists, it
    changed since it was read, or it is gone). Nothing was written."""


@dataclass
class DeployResult:
    model: str
    version: str
    location: str
    changed: bool  # False: current.json already pointed at this verified version
    pointer: dict[str, Any]
    verified_by: dict[str, str] = field(default_factory=dict)
    """file name -> S3_CHECKSUM or READ_BACK: how each file of the version was verified."""


@dataclass(frozen=True)
class Stored:
    """What a store says about an object without reading its bytes."""

    size: int
    sha256: str | None = None
    """hex; the store's own SHA-256 of the object (S3's ChecksumSHA256), None where it keeps none."""
    parts: int = 0
    """0: one PUT, sha256 is the object's; N >= 1: a multipart upload of N parts, sha256 is the SHA-256 of
    the concatenated SHA-256 digests of its parts (S3's composite checksum)."""
    part_size: int = 0
    """bytes of every part but the last (multipart objects with a checksum only)."""


@dataclass
class Verification:
    """The outcome of `check`: every problem (none: the version verifies) and how each file was verified."""

    problems: list[str]
    verified_by: dict[str, str]


class Store(Protocol):
    location: str

    def put_file(self, key: str, path: Path, sha256: str) -> None: ...

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None: ...

    def read(self, key: str) -> bytes | None: ...

    def read_tagged(self, key: str) -> tuple[bytes, str] | None: ...

    def stored(self, key: str) -> Stored | None: ...

    def digest(self, key: str) -> tuple[int, str] | None: ...

    def abort_incomplete(self, key: str) -> int: ...


# ------------------------------------------------------------------------------------------------ targets


def s3_client_config(max_attempts: int) -> BotoConfig:
    """botocore's standard retry mode with `max_attempts` attempts per request, the first included (throttling,
    5xx and connection errors are retried with jittered exponential backoff; a refused condition, 412, is not)."""
    return BotoConfig(retries={"mode": "standard", "total_max_attempts": max_attempts})


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
                       chunk=int(settings.multipart_chunk_mb * 2**20), max_attempts=settings.max_attempts)
    if "://" in target:
        raise DeployError(f"{target}: unsupported target (s3://bucket/prefix or a local folder)")
    return LocalStore(shared_path(target))


class LocalStore:
    """A folder with the S3 layout. Every write goes to a uniquely named temporary sibling (`.<name>.*.tmp`)
    renamed into place; a conditional write holds an exclusive flock on the key's folder while it compares and
    renames, so two processes on the same folder get S3's If-None-Match / If-Match semantics. A key's tag is
    the sha256 of its bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def _path(self, key: str) -> Path:
        """The key's file, confined to the root after resolving symlinks (a key from a pointer is data)."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise DeployError(f"{self.root}: key {key!r} resolves to {path}, outside the deployment root")
        return path

    @staticmethod
    def _replace(dst: Path, fill) -> None:
        """`fill(tmp)` writes a new temporary sibling of dst, which then replaces dst (atomic on POSIX). The name
        is this writer's own (pid and a random part), so concurrent writers never share a temporary; the file
        gets the umask's permissions, as a plain write would."""
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
        try:
            fill(tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    @contextmanager
    def _locked(folder: Path) -> Iterator[None]:
        """An exclusive flock on the folder itself (no lock file in the layout); closing the descriptor frees it."""
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        self._replace(dst, lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None:
        """Write `data` at `key`; if_absent: only where nothing is; if_match: only while its bytes hash to
        that tag. Conflict (nothing written) otherwise."""
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(dst.parent):
            current = dst.read_bytes() if dst.is_file() else None
            if if_absent and current is not None:
                raise Conflict(f"{dst}: exists already")
            if if_match is not None and (current is None or hashlib.sha256(current).hexdigest() != if_match):
                raise Conflict(f"{dst}: {'gone' if current is None else 'changed'} since it was read")
            self._replace(dst, lambda tmp: tmp.write_bytes(data))

    def read(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The key's bytes and their tag (what put_bytes(if_match=) compares), None when it is absent."""
        data = self.read(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def stored(self, key: str) -> Stored | None:
        """Size only: a folder keeps no checksum (files are verified by reading them back)."""
        path = self._path(key)
        return Stored(path.stat().st_size) if path.is_file() else None

    def digest(self, key: str) -> tuple[int, str] | None:
        path = self._path(key)
        return (path.stat().st_size, sha256_file(path)) if path.is_file() else None

    def abort_incomplete(self, key: str) -> int:
        """Remove the temporary files a killed copy left under `key` (`.<name>.*.tmp`). Returns how many."""
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
_REFUSED = {"PreconditionFailed", "ConditionalRequestConflict", "412"}  # what S3 answers a failed condition


def s3_sha256(checksum: str) -> tuple[str, int | None]:
    """S3's ChecksumSHA256 (base64 of the raw digest, `-N` appended for a multipart object's composite) as
    (hex digest, N or None).

    >>> s3_sha256("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")[0][:12], s3_sha256("AAAA-3")[1]
    ('e3b0c44298fc', 3)
    """
    value, _, parts = checksum.partition("-")
    return base64.b64decode(value).hex(), int(parts) if parts else None


def composite_sha256(path: Path, part_size: int) -> tuple[str, int]:
    """S3's composite checksum of `path` uploaded in parts of `part_size` bytes (the last may be shorter):
    (hex SHA-256 of the concatenated raw SHA-256 digests of the parts, number of parts)."""
    digests = []
    with open(path, "rb") as f:
        while True:
            h, left = hashlib.sha256(), part_size
            while left and (block := f.read(min(CHUNK, left))):
                h.update(block)
                left -= len(block)
            if left == part_size:
                break
            digests.append(h.digest())
    return hashlib.sha256(b"".join(digests)).hexdigest(), len(digests)


class S3Store:
    """A bucket prefix through boto3 (multipart from `threshold` bytes, parts of `chunk` bytes). Every write asks
    S3 for a SHA-256 checksum; conditional writes use If-None-Match / If-Match (the tag is the ETag)."""

    def __init__(self, bucket: str, prefix: str, *, client=None, threshold: int, chunk: int,
                 max_attempts: int = 5) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.client = client or boto3.client("s3", config=s3_client_config(max_attempts))
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
        """Upload `path` (in parts from the threshold), S3 checking each part's SHA-256 as it arrives. A failed
        or interrupted upload aborts its parts."""
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"})
        except (BotoCoreError, ClientError, S3UploadFailedError) as err:
            self.abort_incomplete(key, quiet=True)  # parts of a failed multipart upload cost storage until aborted
            raise self._failed("upload of", key, err) from None
        except BaseException:
            self.abort_incomplete(key, quiet=True)
            raise

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None:
        """One PUT with a SHA-256 checksum; if_absent: If-None-Match *, if_match: If-Match <ETag>. Conflict
        (nothing written) when S3 refuses the condition, or the key is gone under If-Match."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data,
                                "ChecksumAlgorithm": "SHA256"}
        if if_absent:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            self.client.put_object(**args)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if (if_absent or if_match is not None) and (code in _REFUSED or (if_match and code == "NoSuchKey")):
                state = "gone" if code == "NoSuchKey" else "exists already" if if_absent else "changed"
                raise Conflict(f"s3://{self.bucket}/{self._key(key)}: {state} ({code})") from None
            raise self._failed("write of", key, err) from None
        except BotoCoreError as err:
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

    def _call(self, what: str, key: str, method, **args) -> dict | None:
        """client.<method>(Bucket, Key, **args); None when the key does not exist, a DeployError otherwise."""
        try:
            return method(Bucket=self.bucket, Key=self._key(key), **args)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._failed(what, key, err) from None
        except BotoCoreError as err:
            raise self._failed(what, key, err) from None

    def _get(self, key: str) -> dict | None:
        # ChecksumMode: botocore checks the body against a whole-object checksum as it streams
        return self._call("read of", key, self.client.get_object, ChecksumMode="ENABLED")

    def _body(self, key: str, got: dict, chunk: int | None = None) -> Iterator[bytes]:
        """The body of a get_object answer, in blocks of `chunk` bytes (None: one block); a broken stream or a
        body that does not match S3's whole-object checksum is a DeployError naming the key."""
        try:
            yield from iter(lambda: got["Body"].read(chunk), b"")
        except BotoCoreError as err:
            raise self._failed("read of", key, err) from None

    def read(self, key: str) -> bytes | None:
        got = self._get(key)
        return None if got is None else b"".join(self._body(key, got))

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its ETag (what put_bytes(if_match=) sends), None when it is absent."""
        got = self._get(key)
        return None if got is None else (b"".join(self._body(key, got)), got["ETag"])

    def stored(self, key: str) -> Stored | None:
        """Size and S3's ChecksumSHA256 from a HEAD (ChecksumMode ENABLED); a multipart object (ETag or
        checksum ending in -N) also gets its part size, from a HEAD of part 1."""
        head = self._call("check of", key, self.client.head_object, ChecksumMode="ENABLED")
        if head is None:
            return None
        sha = count = None
        if head.get("ChecksumSHA256"):
            sha, count = s3_sha256(head["ChecksumSHA256"])
        etag_parts = re.search(r"-(\d+)\"?$", head.get("ETag", ""))
        parts = count or (int(etag_parts.group(1)) if etag_parts else 0)
        if not parts and head.get("ChecksumType") == "COMPOSITE":
            parts = int(head.get("PartsCount") or 1)
        part_size = 0
        if parts and sha is not None:
            first = self._call("check of", key, self.client.head_object, PartNumber=1)
            part_size = int(first["ContentLength"]) if first else 0
        return Stored(int(head["ContentLength"]), sha, parts, part_size)

    def digest(self, key: str) -> tuple[int, str] | None:
        got = self._get(key)
        if got is None:
            return None
        h, size = hashlib.sha256(), 0
        for chunk in self._body(key, got, CHUNK):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()


# ------------------------------------------------------------------------------------------------ deploy


def deploy(settings: DeployConfig, registry: RegistryConfig, tracking: TrackingConfig, *, version: str | None = None,
           target: str | None = None, s3_client=None) -> DeployResult:
    """Deploy `version` (default: the `champion`) of registry.model_name to `target` (default settings.target).
    Refuses (DeployError) before touching the target unless the version holds `champion` with a passed gate."""
    # lazy: the registry brings mlflow and torch (seconds); publish, rollback, verify and clean need neither
    from umo.registry import CHAMPION, DECISION_TAG, RegistryError, approved_champion, client_for, version_files

    name = registry.model_name
    client = client_for(tracking)
    try:
        mv = approved_champion(client, name, version)
    except RegistryError as err:
        raise DeployError(str(err)) from err
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    pointer = read_pointer(store, name)
    if pointer and pointer.get("version") == str(mv.version):
        found = check(store, name, str(mv.version))
        if not found.problems:
            log.info("%s version %s is already deployed to %s and verifies: nothing to do", name, mv.version,
                     store.location)
            return DeployResult(name, str(mv.version), store.location, False, pointer, found.verified_by)
        log.warning("%s version %s at %s does not verify (%s): deploying it again", name, mv.version,
                    store.location, "; ".join(found.problems))

    with tempfile.TemporaryDirectory(prefix="umo-deploy-") as tmp:
        files = version_files(client, name, mv.version, tmp)
        return publish(store, name, str(mv.version), list(files.values()),
                       {"run_id": mv.run_id, "gate": mv.tags.get(DECISION_TAG), "alias": CHAMPION}, pointer)


def publish(store: Store, name: str, version: str, files: list[Path], info: dict[str, Any],
            pointer: dict | None) -> DeployResult:
    """Upload `files` and their manifest to <name>/<version>/, verify every object, then write current.json.
    `pointer`: current.json as the caller read it (None: nothing deployed); its version goes first in the new
    history.

    Guarantees: <name>/<version>/ is immutable: an existing manifest.json with other bytes is refused
    (DeployError) before anything is written, the same bytes resume or repair the version (files that already
    verify are not uploaded again). current.json is written only after every object verified, and only while it
    is still `pointer`: otherwise DeployError "another deployer changed current.json" and it is left as it is.
    The version's files stay in place after any failure (a re-run completes them)."""
    root = f"{name}/{version}"
    for path in files:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
    entries = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files}
    manifest = {"model": name, "version": version, "files": entries, **info}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    _claim_version(store, name, version, manifest_bytes)
    for path in files:
        key = f"{root}/{path.name}"
        if store.stored(key) is not None:
            problem, how = check_file(store, key, entries[path.name], path)
            if problem is None:
                log.info("%s/%s is already there and verifies (%s): not uploaded again", store.location, key, how)
                continue
            log.warning("%s: %s; uploading it again", store.location, problem)
        log.info("upload %s (%d bytes) to %s/%s", path.name, path.stat().st_size, store.location, root)
        store.put_file(key, path, entries[path.name]["sha256"])
    found = check(store, name, version, expected=manifest_bytes, local={p.name: p for p in files})
    if found.problems:
        raise DeployError(f"{store.location}/{root}: verification failed, current.json unchanged: "
                          + "; ".join(found.problems))
    history = [] if not pointer else [pointer["version"], *pointer.get("history", [])]
    new = {"model": name, "version": version, "path": root, "manifest": f"{root}/{MANIFEST}",
           "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "deployed_at": _now(),
           "verified_by": found.verified_by, "history": [v for v in history if v != version]}
    _swap_pointer(store, name, pointer, new)
    log.info("deployed %s version %s to %s (current.json written)", name, version, store.location)
    return DeployResult(name, version, store.location, True, new, found.verified_by)


def rollback(settings: DeployConfig, name: str, *, target: str | None = None, s3_client=None) -> DeployResult:
    """Point model `name`'s current.json back at the newest earlier deployed version, after verifying that
    version; written as publish writes it (only while current.json is what was read)."""
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    pointer = read_pointer(store, name)
    if not pointer or not pointer.get("history"):
        raise DeployError(f"{store.location}/{name}: nothing to roll back to (no earlier deployment recorded)")
    previous, rest = pointer["history"][0], pointer["history"][1:]
    found = check(store, name, previous)
    if found.problems:
        raise DeployError(f"{store.location}/{name}/{previous}: cannot roll back, it does not verify: "
                          + "; ".join(found.problems))
    manifest_bytes = store.read(f"{name}/{previous}/{MANIFEST}") or b""
    new = {"model": name, "version": previous, "path": f"{name}/{previous}",
           "manifest": f"{name}/{previous}/{MANIFEST}",
           "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "deployed_at": _now(),
           "verified_by": found.verified_by, "history": rest, "rolled_back_from": pointer["version"]}
    _swap_pointer(store, name, pointer, new)
    log.info("%s: current.json now points at version %s (rolled back from %s)", name, previous, pointer["version"])
    return DeployResult(name, previous, store.location, True, new, found.verified_by)


def clean_incomplete(settings: DeployConfig, name: str, *, target: str | None = None, s3_client=None) -> int:
    """Abort the unfinished uploads (S3 multipart, or a folder's temporaries) a killed deploy left under model
    `name`'s prefix; what current.json points at is untouched (its objects are complete). Returns how many.
    Run it while no deploy of the model is running (it would abort that one's uploads too)."""
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    n = store.abort_incomplete(f"{name}/")
    log.info("%s/%s: %d unfinished upload(s) removed", store.location, name, n)
    return n


def check_file(store: Store, key: str, meta: dict[str, Any], local: Path | None = None) -> tuple[str | None, str]:
    """(problem or None, how it was verified) for one object against its manifest entry (`size`, `sha256`).
    S3's whole-object ChecksumSHA256 is compared without reading; a multipart object's composite is compared
    with the same composite of `local` (a copy of the file whose sha256 is meta's), when given; anything else
    is read back in full and hashed."""
    got = store.stored(key)
    if got is None:
        return f"{key} missing", ""
    if got.size != meta["size"]:
        return f"{key}: size {got.size} but the manifest says size {meta['size']} sha256 {meta['sha256'][:12]}…", ""
    if got.sha256 is not None and not got.parts:
        if got.sha256 == meta["sha256"]:
            return None, S3_CHECKSUM
        return (f"{key}: size {got.size} sha256 {got.sha256[:12]}… (S3's ChecksumSHA256) but the manifest says "
                f"size {meta['size']} sha256 {meta['sha256'][:12]}…"), S3_CHECKSUM
    if got.sha256 is not None and got.part_size and local is not None:
        want, parts = composite_sha256(local, got.part_size)
        if (want, parts) == (got.sha256, got.parts):
            return None, S3_CHECKSUM
        return (f"{key}: S3's composite ChecksumSHA256 of {got.parts} parts ({got.sha256[:12]}…) is not that of "
                f"{local} in parts of {got.part_size} bytes ({parts} parts, {want[:12]}…)"), S3_CHECKSUM
    read = store.digest(key)
    if read is None:
        return f"{key} missing", ""
    if read != (meta["size"], meta["sha256"]):
        return (f"{key}: size {read[0]} sha256 {read[1][:12]}… but the manifest says size {meta['size']} sha256 "
                f"{meta['sha256'][:12]}…"), READ_BACK
    return None, READ_BACK


def check(store: Store, name: str, version: str, *, expected: bytes | None = None,
          local: dict[str, Path] | None = None) -> Verification:
    """Every problem of a deployed version (manifest missing, changed or not `expected`; a file missing, of
    another size or sha256) and how each file was verified (check_file; `local`: file name -> a copy of it, for
    multipart objects). Logs the method used for each file."""
    root = f"{name}/{version}"
    raw = store.read(f"{root}/{MANIFEST}")
    if raw is None:
        return Verification([f"{root}/{MANIFEST} missing"], {})
    if expected is not None and raw != expected:
        return Verification([f"{root}/{MANIFEST} differs from what was written"], {})
    try:
        files = json.loads(raw)["files"]
        entries = sorted(files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        return Verification([f"{root}/{MANIFEST} is not a deployment manifest"], {})
    problems, verified_by = [], {}
    for file, meta in entries:
        problem, how = check_file(store, f"{root}/{file}", meta, (local or {}).get(file))
        if problem:
            problems.append(problem)
        else:
            verified_by[file] = how
    if verified_by:
        log.info("%s/%s: %s", store.location, root, ", ".join(f"{f} verified by {h}" for f, h in verified_by.items()))
    return Verification(problems, verified_by)


def verify(store: Store, name: str, version: str, *, expected: bytes | None = None) -> list[str]:
    """check()'s problems alone (empty list: the version verifies)."""
    return check(store, name, version, expected=expected).problems


def verify_current(settings: DeployConfig, name: str, *, target: str | None = None, s3_client=None) -> DeployResult:
    """What model `name`'s current.json points at, verified; DeployError listing every problem otherwise."""
    store = parse_target(target or settings.target, settings, s3_client=s3_client)
    pointer = read_pointer(store, name)
    if not pointer:
        raise DeployError(f"{store.location}/{name}/{POINTER}: nothing deployed")
    found = check(store, name, pointer["version"])
    manifest = store.read(pointer["manifest"]) or b""
    if hashlib.sha256(manifest).hexdigest() != pointer.get("manifest_sha256"):
        found.problems.append(f"{pointer['manifest']}: not the manifest current.json was written for")
    if found.problems:
        raise DeployError(f"{store.location}/{name} version {pointer['version']} does not verify: "
                          + "; ".join(found.problems))
    return DeployResult(name, pointer["version"], store.location, False, pointer, found.verified_by)


def _claim_version(store: Store, name: str, version: str, manifest_bytes: bytes) -> None:
    """Create <name>/<version>/manifest.json where none exists (If-None-Match *); an existing one must hold the
    same bytes (a resumed or repeated deploy), anything else is refused: a version folder is immutable."""
    key = f"{name}/{version}/{MANIFEST}"
    existing = store.read(key)  # first, for stores that ignore conditions: they still refuse the plain case
    if existing is None:
        try:
            store.put_bytes(key, manifest_bytes, if_absent=True)
            return
        except Conflict:
            existing = store.read(key) or b""  # another deployer claimed the version since our read
    if existing == manifest_bytes:
        log.info("%s/%s holds these files already: completing or repairing that version", store.location, key)
        return
    raise DeployError(f"{store.location}/{key}: version {version} is already deployed with other content "
                      f"({_differences(existing, manifest_bytes)}); a deployed version is immutable: deploy these "
                      f"files as a new version (or, if nothing points at {name}/{version}/, delete it by hand)")


def _differences(old: bytes, new: bytes) -> str:
    """What differs between two manifests, in words (the files first)."""
    try:
        before, after = json.loads(old), json.loads(new)
        a, b = before.get("files", {}), after.get("files", {})
    except (ValueError, AttributeError):
        return "the existing manifest is not a deployment manifest"
    files = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
    if files:
        return "files that differ: " + ", ".join(files)
    fields = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return "fields that differ: " + ", ".join(fields)


def _swap_pointer(store: Store, name: str, expected: dict | None, new: dict) -> None:
    """Write current.json = `new` only while it is still `expected` (None: absent): the current bytes are read
    with their tag and compared, then written with If-Match <tag> (If-None-Match * where there is none), so a
    deployer that changed it in between makes this one fail, not be overwritten. DeployError otherwise."""
    key = f"{name}/{POINTER}"
    where = f"{store.location}/{key}"
    payload = (json.dumps(new, indent=2) + "\n").encode()
    found = store.read_tagged(key)
    tag = None if found is None else found[1]
    current = None if found is None else _parse_json(found[0], where)
    try:
        if current != expected:
            raise Conflict(where)
        store.put_bytes(key, payload, if_absent=tag is None, if_match=tag)
    except Conflict:
        now = store.read(key)
        if now == payload:  # our own write, answered twice: a retried request whose first answer was lost
            return
        latest = None if now is None else _parse_json(now, where)
        raise DeployError(
            f"{where}: another deployer changed current.json after this run read it (it pointed at "
            f"{_version_words(expected)}, now at {_version_words(latest)}); "
            f"nothing was written to it and version {new['version']}'s files stay verified under "
            f"{new['path']}/; re-run to deploy on top of it") from None


def _version_words(pointer: Any) -> str:
    if pointer is None:
        return "nothing"
    return f"version {pointer.get('version')}" if isinstance(pointer, dict) else "something that is not a pointer"


def _check_safetensors(path: Path) -> None:
    """A readable safetensors file with at least one tensor (its header parsed; numpy: no torch import)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            if not list(f.keys()):
                raise DeployError(f"{path}: a safetensors file without tensors")
    except DeployError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise DeployError(f"{path}: not a readable safetensors file: {err}") from err


_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")  # MLflow's are integers; never a path


def read_pointer(store: Store, name: str) -> dict | None:
    """current.json, with every version it names (version, history) checked to be a version, not a path, and its
    manifest field the version's own; a DeployError names the file and the field otherwise."""
    raw = store.read(f"{name}/{POINTER}")
    if raw is None:
        return None
    where = f"{store.location}/{name}/{POINTER}"
    pointer = _parse_json(raw, where)
    history = pointer.get("history", []) if isinstance(pointer, dict) else None
    if not isinstance(history, list):
        raise DeployError(f"{where}: not a deployment pointer (expected an object with a history list)")
    for field_, value in [("version", pointer.get("version")), *((f"history[{k}]", v) for k, v in enumerate(history))]:
        if not isinstance(value, str) or not _VERSION.fullmatch(value) or ".." in value:
            raise DeployError(f"{where}: {field_} {value!r} is not a version (a path there could lead outside "
                              f"{store.location}/{name}); fix the file by hand")
    if pointer.get("manifest", f"{name}/{pointer['version']}/{MANIFEST}") != f"{name}/{pointer['version']}/{MANIFEST}":
        raise DeployError(f"{where}: manifest {pointer['manifest']!r} is not {name}/{pointer['version']}/{MANIFEST}")
    return pointer


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as err:
        raise DeployError(f"{where}: not JSON ({err}); fix or remove it by hand") from err


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
