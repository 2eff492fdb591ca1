"""The fault proxy itself (tests/faults.py): transparent unless a rule picks a request, seeded, bounded."""

from __future__ import annotations

import socket
import threading

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from faults import FaultProxy, Rule

from pipelines.storage import objects


def s3_client(endpoint_url: str | None = None):
    """A plain boto3 client (from the environment: through the proxy) with the SDK's retries off, so
    every fault reaches the test."""
    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(retries={"total_max_attempts": 1}))


def test_without_rules_every_request_is_forwarded_unchanged_and_counted_per_key(fault_proxy, s3_bucket):
    client = s3_client()
    assert client.meta.endpoint_url == fault_proxy.endpoint
    key = "dir with space/ünï café.jpg"
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"\xff\xd8" + bytes(range(256)) * 300)
    assert (
        client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"\xff\xd8" + bytes(range(256)) * 300
    )
    assert client.head_object(Bucket=s3_bucket, Key=key)["ContentLength"] == 2 + 256 * 300
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="dir with space/")
    assert [o["Key"] for o in listed["Contents"]] == [key]
    client.delete_object(Bucket=s3_bucket, Key=key)
    assert (fault_proxy.count(key, "PUT"), fault_proxy.count(key, "GET"), fault_proxy.count(key, "HEAD")) == (
        1,
        1,
        1,
    )
    assert fault_proxy.count(key) == 4 and fault_proxy.count("", "GET") == 1  # the listing: bucket level
    assert fault_proxy.faults == []
    fault_proxy.clear()
    assert fault_proxy.count() == 0


def test_rules_pick_by_method_key_and_times_and_the_first_that_picks_wins(fault_proxy, s3_bucket):
    client = s3_client()
    client.put_object(Bucket=s3_bucket, Key="a/one.jpg", Body=b"1")
    client.put_object(Bucket=s3_bucket, Key="b/two.jpg", Body=b"2")
    fault_proxy.set_rules(
        [
            Rule("AccessDenied", method="GET", key="one", times=1),
            Rule("NoSuchKey", method="GET", key="one"),
            Rule("SlowDown", method="PUT"),
        ]
    )
    codes = []
    for _ in range(2):
        with pytest.raises(ClientError) as info:
            client.get_object(Bucket=s3_bucket, Key="a/one.jpg")
        codes.append(info.value.response["Error"]["Code"])
    assert codes == ["AccessDenied", "NoSuchKey"]
    assert client.get_object(Bucket=s3_bucket, Key="b/two.jpg")["Body"].read() == b"2"
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=s3_bucket, Key="b/two.jpg", Body=b"3")
    assert info.value.response["Error"]["Code"] == "SlowDown"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert fault_proxy.faults == [
        ("GET", "a/one.jpg", "AccessDenied"),
        ("GET", "a/one.jpg", "NoSuchKey"),
        ("PUT", "b/two.jpg", "SlowDown"),
    ]


def test_a_head_error_has_no_body_and_is_classified_by_its_http_status(fault_proxy, s3_bucket):
    client = s3_client()
    client.put_object(Bucket=s3_bucket, Key="h.jpg", Body=b"h")
    for fault, status, reason in (("AccessDenied", 403, "access_denied"), ("NoSuchKey", 404, "not_found")):
        fault_proxy.set_rules([Rule(fault, method="HEAD")])
        with pytest.raises(ClientError) as info:
            client.head_object(Bucket=s3_bucket, Key="h.jpg")
        assert info.value.response["Error"]["Code"] == str(status)  # no XML: botocore has only the status
        assert objects.classify(info.value, f"s3://{s3_bucket}/h.jpg").reason == reason


def test_a_fraction_rule_is_seeded_so_a_run_can_be_repeated(fault_proxy, s3_bucket):
    client = s3_client()
    client.put_object(Bucket=s3_bucket, Key="f.jpg", Body=b"f")

    def outcomes(seed: int) -> list[bool]:
        fault_proxy.set_rules([Rule("InternalError", method="GET", fraction=0.3)], seed=seed)
        hit = []
        for _ in range(60):
            try:
                client.get_object(Bucket=s3_bucket, Key="f.jpg")["Body"].read()
                hit.append(False)
            except ClientError:
                hit.append(True)
        return hit

    first = outcomes(seed=7)
    assert 6 <= sum(first) <= 32  # about 30% of 60
    assert outcomes(seed=7) == first
    assert outcomes(seed=8) != first


def test_the_proxy_only_forwards_to_loopback_and_leaves_nothing_running_when_stopped(s3_server, s3_bucket):
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://example.com:80")
    with FaultProxy(s3_server) as proxy:
        client = s3_client(proxy.endpoint)
        client.put_object(Bucket=s3_bucket, Key="k.jpg", Body=b"k")  # leaves a keep-alive connection open
        assert any(t.name == "fault-proxy-conn" for t in threading.enumerate())
        port = int(proxy.endpoint.rsplit(":", 1)[1])
    assert not [t for t in threading.enumerate() if t.name.startswith("fault-proxy")]
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
