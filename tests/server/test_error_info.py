"""google.rpc.ErrorInfo: every RESOURCE_EXHAUSTED and PERMISSION_DENIED the one mapping makes
carries a stable reason in tinyserve's domain, and the proto documents every reason."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tinyserve.api import errors
from tinyserve.engine.engine import QueueFullError
from tinyserve.tenancy import errors as tenancy

ROOT = Path(__file__).resolve().parents[2]


def infos(exc: BaseException) -> tuple[grpc.StatusCode, list[error_details_pb2.ErrorInfo]]:
    st = errors.to_status(exc, "rid")
    (raw,) = [v for k, v in st.trailing_metadata if k == rpc_status.GRPC_DETAILS_METADATA_KEY]
    out = []
    for any_ in status_pb2.Status.FromString(raw).details:
        info = error_details_pb2.ErrorInfo()
        if any_.Unpack(info):
            out.append(info)
    return st.code, out


def quota_kinds() -> set[str]:
    """Every QuotaExceeded kind that tenancy/quotas.py raises (read from its source)."""
    src = (ROOT / "server/tinyserve/tenancy/quotas.py").read_text()
    kinds = set(re.findall(r'QuotaExceeded\(\s*[\w.]+,\s*"(\w+)"', src))
    kinds |= {"requests_per_minute", "tokens_per_minute"}  # raised through a variable
    assert {"concurrency", "max_queued", "max_prompt_tokens", "max_output_tokens"} <= kinds
    return kinds


def test_every_quota_kind_has_its_reason_and_metadata():
    for kind in sorted(quota_kinds()):
        exc = tenancy.QuotaExceeded("acme", kind, "some_field", "over it", 2.0, 7)
        code, (info,) = infos(exc)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.reason == errors.QUOTA_REASONS[kind] and info.domain == errors.DOMAIN
        assert dict(info.metadata) == {"tenant": "acme", "limit": "some_field", "limit_value": "7"}


def test_server_wide_and_permission_and_unavailable_reasons():
    assert infos(QueueFullError("full"))[1][0].reason == "SERVER_QUEUE_FULL"
    code, (info,) = infos(tenancy.PermissionDenied("acme", "m"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (info.reason, dict(info.metadata)) == ("MODEL_NOT_ALLOWED", {"tenant": "acme", "model": "m"})
    code, (info,) = infos(tenancy.QuotaStoreUnavailable("redis down"))
    assert (code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "QUOTA_STORE_UNAVAILABLE")
    assert infos(errors.ResourceExhausted("s", "d"))[1][0].reason == "RESOURCE_EXHAUSTED"


def test_the_proto_documents_every_reason():
    proto = (ROOT / "proto/tinyserve/v1/tinyserve.proto").read_text()
    reasons = set(errors.QUOTA_REASONS.values()) | {getattr(errors, n) for n in dir(errors) if n.startswith("REASON_")}
    for reason in sorted(reasons):
        assert re.search(rf"//\s+{reason}\b", proto), reason
