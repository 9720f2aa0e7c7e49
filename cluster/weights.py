"""Read a backbone's pretrained weights from where they live, and the sha256 that goes into stage keys.

A source is a string:
    timm:<arch.tag>              timm's pretrained weights (the HF hub, through its local cache)
    /path/w.safetensors          a local file: .safetensors, or .pth/.pt/.bin read with weights_only=True
    s3://bucket/key.safetensors  the same on S3 (AWS_ENDPOINT_URL honoured), cached locally by URI + ETag

The sha256 is always that of the weight file's bytes, so a stage key names exactly what was loaded;
`weights_digest` computes it without building a model (for the key, at plan time) and `read_weights_source`
returns it with the tensors (for the stage, which checks it against its key).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
from pathlib import Path

import boto3
import safetensors.torch
import torch
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from safetensors import SafetensorError
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from vitpipe.cluster.fs import is_s3
from vitpipe.cluster.retry import DEFAULT_RETRY, RetryPolicy, TransientError
from vitpipe.models.settings import ViTSpec
from vitpipe.models.weights import (
    TimmWeights,
    WeightsError,
    WeightsReport,
    load_into,
    timm_state_dict,
    timm_weights_location,
    unwrap_checkpoint,
)

DEFAULT_CACHE = Path.home() / ".cache" / "vitpipe" / "weights"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_CHUNK = 1 << 20


class WeightsUnavailable(WeightsError, TransientError):
    """S3 or the HF hub did not answer through every retry; the stage may succeed when retried."""


def read_weights_source(source: str, cache_dir: str | Path = DEFAULT_CACHE,
                        retry: RetryPolicy = DEFAULT_RETRY) -> tuple[dict[str, Tensor], str]:
    """(state dict, sha256 of the weight file) of a source; a timm: state dict is timm's own, full
    model (head included), the others the file's tensors, unwrapped (`{'model': ...}`)."""
    if source.startswith("timm:"):
        name = source[len("timm:"):]
        location = timm_weights_location(name)
        path = _timm_file(source, location)
        return timm_state_dict(name, path, location.custom_load), sha256_file(path)
    path = _local_file(source, cache_dir, retry)
    data = path.read_bytes()  # hashed and parsed from the same bytes: the sha names what was loaded
    return _parse(data, path.name, source), hashlib.sha256(data).hexdigest()


def weights_digest(source: str, cache_dir: str | Path = DEFAULT_CACHE, retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """sha256 of the source's weight file, fetched into its cache when needed; no model is built."""
    if source.startswith("timm:"):
        return sha256_file(_timm_file(source, timm_weights_location(source[len("timm:"):])))
    return sha256_file(_local_file(source, cache_dir, retry))


def local_weights_file(source: str, cache_dir: str | Path = DEFAULT_CACHE, retry: RetryPolicy = DEFAULT_RETRY) -> Path:
    """The local file a source resolves to (downloaded into its cache first when remote)."""
    if source.startswith("timm:"):
        return Path(_timm_file(source, timm_weights_location(source[len("timm:"):])))
    return _local_file(source, cache_dir, retry)


def pretrained_backbone(spec: ViTSpec, weights: str, num_classes: int = 0, expected_sha256: str | None = None,
                        cache_dir: str | Path = DEFAULT_CACHE) -> tuple[VisionTransformer, WeightsReport, str]:
    """`spec`'s backbone (with a new `num_classes` head) loaded from `weights`; WeightsError when the file's
    sha256 is not `expected_sha256` (the one in the stage key) or its keys do not fit."""
    state, sha = read_weights_source(weights, cache_dir)
    if expected_sha256 is not None and sha != expected_sha256:
        raise WeightsError(f"weights {weights}: sha256 {sha[:12]} is not the stage key's {expected_sha256[:12]}: "
                           "the file changed since the key was computed")
    model = spec.build(num_classes=num_classes)
    return model, load_into(model, state, weights, arch=spec.arch), sha


def sha256_file(path: str | Path) -> str:
    """Streamed sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _parse(data: bytes, name: str, source: str) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a torch checkpoint that unpickles without any code."""
    if name.endswith(".safetensors"):
        try:
            return unwrap_checkpoint(safetensors.torch.load(data), source)
        except SafetensorError as e:
            raise WeightsError(f"weights {source}: not a valid safetensors file: {e}") from e
    if name.endswith(TORCH_SUFFIXES):
        try:
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise WeightsError(f"weights {source}: refused by torch.load(weights_only=True): {_unpickle_reason(e)}; "
                               "save a plain state dict (or convert it to .safetensors)") from e
        return unwrap_checkpoint(checkpoint, source)
    raise WeightsError(f"weights {source}: unknown file type (use .safetensors, {', '.join(TORCH_SUFFIXES)} "
                       "or timm:<arch.tag>)")


def _unpickle_reason(e: Exception) -> str:
    """The line of torch's multi-line weights_only message that says what was refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines else type(e).__name__


def _local_file(source: str, cache_dir: str | Path, retry: RetryPolicy) -> Path:
    if is_s3(source):
        return _s3_file(source, Path(cache_dir), retry)
    if "://" in source:
        raise WeightsError(f"weights {source}: unsupported URI scheme (use a local path, s3:// or timm:)")
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights {source}: no such file")
    return path


def _s3_file(uri: str, cache_dir: Path, retry: RetryPolicy) -> Path:
    """The object's local copy under `cache_dir`, keyed by URI and ETag: a changed object is fetched
    again, an unchanged one never; the GET is conditional on that ETag, the copy renamed into place."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise WeightsError(f"weights {uri}: expected s3://bucket/key")
    client = boto3.session.Session().client("s3", config=retry.botocore_config())
    try:
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"]
        entry = cache_dir / hashlib.sha256(f"{uri}\n{etag}".encode()).hexdigest()[:32]
        path = entry / os.path.basename(key)
        if path.is_file():
            return path
        entry.mkdir(parents=True, exist_ok=True)
        body = client.get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"]
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in body.iter_chunks(_CHUNK):
                    f.write(chunk)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    except (ClientError, BotoCoreError) as e:
        raise _s3_error(uri, client.meta.endpoint_url, e) from e


def _s3_error(uri: str, endpoint: str, e: Exception) -> WeightsError:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = err.get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return WeightsError(f"weights {uri}: no such object (endpoint {endpoint})")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        reason = f"{code}: {err.get('Message', '')}".rstrip(": ")
        transient = status >= 500 or code in ("SlowDown", "Throttling", "PreconditionFailed", "412")
    else:
        reason, transient = str(e), isinstance(e, BotoConnectionError | HTTPClientError)
    cls = WeightsUnavailable if transient else WeightsError
    return cls(f"weights {uri}: S3 read failed (endpoint {endpoint}): {reason}")


def _timm_file(source: str, location: TimmWeights) -> str:
    """The local file timm would load for its pretrained config `location`, downloaded into timm's or
    the HF hub's usual cache when not there yet."""
    if location.kind == "file":
        if not os.path.isfile(location.location):
            raise WeightsError(f"weights {source}: timm's weight file {location.location} does not exist")
        return location.location
    if location.kind == "url":
        from timm.models._hub import download_cached_file

        try:
            return download_cached_file(location.location)
        except OSError as e:
            raise WeightsUnavailable(f"weights {source}: download of {location.location} failed: {e}") from e
    return _hub_file(source, location.location, location.filename, location.custom_load)


def _hub_file(source: str, hub_id: str, filename: str | None, custom_load: bool) -> str:
    """timm's choice of file in a hub repo: a safetensors alternative first, else the pickle-free torch file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    wanted = filename or "pytorch_model.bin"
    names = [wanted] if custom_load else [*_safe_alternatives(wanted), wanted]
    missing = []
    for name in names:
        try:
            return hf_hub_download(repo, filename=name, revision=revision or None)
        except EntryNotFoundError as e:  # not in the repo, or (hub unreachable) not in the local cache
            missing.append(e)
        except HfHubHTTPError as e:
            raise WeightsUnavailable(f"weights {source}: HF hub {repo}/{name}: {str(e).splitlines()[0]}") from e
    if any(isinstance(e, LocalEntryNotFoundError) for e in missing):
        raise WeightsUnavailable(f"weights {source}: {' / '.join(names)} of {repo} is not in the HF cache "
                                 "and the hub is unreachable")
    raise WeightsError(f"weights {source}: the HF hub repo {repo} has none of {', '.join(names)}")


def _safe_alternatives(filename: str) -> list[str]:
    """timm's safetensors names for a torch weight file (timm.models._hub._get_safe_alternatives)."""
    if filename == "pytorch_model.bin":
        return ["model.safetensors"]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    return [filename[:-4] + ".safetensors"] if filename.endswith(".bin") else []
