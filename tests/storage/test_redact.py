"""`storage.redact`: every shape of credential a message can carry, the environment's secrets by value
(read at call time), and what must stay readable."""

from __future__ import annotations

import base64
import time

import pytest

from pipelines.storage import redact

SESSION = "FAKE-SESSION-TOKEN-123456"
MLFLOW_TOKEN = "FAKE-MLFLOW-TOKEN-654321"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "DATABRICKS_TOKEN",
        "DATABRICKS_CLIENT_SECRET",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "name, value",
    [
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ("AWS_SESSION_TOKEN", SESSION),
        ("AWS_SECURITY_TOKEN", SESSION),
        ("MLFLOW_TRACKING_TOKEN", MLFLOW_TOKEN),
        ("MLFLOW_TRACKING_PASSWORD", "hunter2-very"),
        ("DATABRICKS_TOKEN", "dapi0123456789abcdef"),
        ("DATABRICKS_CLIENT_SECRET", "dose0123456789"),
    ],
)
def test_secrets_of_the_environment_are_masked_by_value_at_call_time(monkeypatch, name, value):
    line = f"request failed near {value} (and again:{value}/x)"
    assert redact(line) == line  # not in the environment: nothing to know it by
    monkeypatch.setenv(name, value)
    out = redact(line)
    assert value not in out and out.count("***") == 2
    monkeypatch.setenv(name, value + "-rotated")  # read at each call, not once
    assert value + "-rotated" not in redact(f"x {value}-rotated y")


def test_short_values_and_placeholder_access_keys_stay_readable(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "abc")  # under 6 characters: would mangle every message
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto / minio placeholders are not secrets
    line = "testing abc: s3://bucket/testing/abc.jpg"
    assert redact(line) == line


def test_a_real_looking_access_key_id_is_masked(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AbCdEfGhIjKlMnOpQrSt")
    assert "AbCdEfGhIjKlMnOpQrSt" not in redact("key AbCdEfGhIjKlMnOpQrSt denied")
    assert redact("id AKIAIOSFODNN7EXAMPLE here") == "id *** here"  # the AWS shape, in any environment
    assert redact("id ASIAIOSFODNN7EXAMPLE") == "id ***"


@pytest.mark.parametrize(
    "line, secret",
    [
        ("Authorization: Bearer eyJhbGciOi.JIUzI1NiJ9.abc-def_ghi", "eyJhbGciOi"),
        ("headers={'Authorization': 'Bearer abcdef123456'}", "abcdef123456"),
        ("Authorization: Basic YWxpY2U6c2VjcmV0", "YWxpY2U6c2VjcmV0"),
        ("authorization=tok_123456789", "tok_123456789"),
        ("sent Bearer abc.def/ghi+jk== upstream", "abc.def/ghi+jk=="),
        ("MLFLOW_TRACKING_TOKEN=mlf-123456789", "mlf-123456789"),
        ("aws_session_token = 'IQoJb3JpZ2luX2VjEIj'", "IQoJb3JpZ2luX2VjEIj"),
        ('{"password": "p4ssw0rd!"}', "p4ssw0rd!"),
        ("api_key: k-123456789", "k-123456789"),
        (
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=deadbeef1234",
            "deadbeef1234",
        ),
        ("https://b.s3/k?X-Amz-Security-Token=IQoJb3JpZ2luX2&X-Amz-Expires=60", "IQoJb3JpZ2luX2"),
        (
            "https://b.s3/k?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1",
            "AKIAIOSFODNN7EXAMPLE",
        ),
        ("https://b.s3/k?AWSAccessKeyId=AKIA0000&Signature=c2lnbmF0dXJl&Expires=1", "c2lnbmF0dXJl"),
        ("http://alice:FAKE-PASSWORD-777@127.0.0.1:5000", "FAKE-PASSWORD-777"),
        ("http://alice:pa/ss:w%40rd!$&'()*+,;=@host:5000/api", "pa/ss:w%40rd"),
        ("MLflow run at 'postgresql://u:p~a/s^s@db:5432/mlflow' failed", "p~a/s^s"),
        ("https://ghp_abcdef123456@mlflow.example.com/", "ghp_abcdef123456"),
    ],
)
def test_credential_shapes_are_masked(line, secret):
    out = redact(line)
    assert secret not in out, out
    assert "***" in out


def test_what_is_not_a_credential_stays_readable():
    for line in (
        "s3://bucket/images/img-0-000001.jpg: not_found",
        "models:/mumic-quickstart@champion version 3",
        "sqlite:////tmp/work/mlflow.db",
        "http://127.0.0.1:5000/#/experiments/1",
        "file:///tmp/x/model.safetensors",
        "epoch 2/5  loss 0.1234  val mAP 0.5000",
        "Unable to locate credentials",
        "SignatureDoesNotMatch: The request signature we calculated does not match",
        "mumic train: decoded 600 images (train=480, val=100)",
    ):
        assert redact(line) == line


def test_the_password_of_the_tracking_uri_is_masked_wherever_it_appears(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cr%2Fet-pw@mlflow:5000")
    basic = base64.b64encode(b"alice:s3cr/et-pw").decode()
    out = redact(f"login with s3cr/et-pw or s3cr%2Fet-pw; header {basic}")
    assert "s3cr" not in out and basic not in out


def test_masking_is_stable_and_idempotent(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION)
    once = redact(f"token={SESSION} http://u:pw-123456@h/ {SESSION}")
    assert redact(once) == once and SESSION not in once and "pw-123456" not in once


def test_fast_enough_for_every_error_row(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-never-logged")
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MLFLOW_TOKEN)
    line = "s3://bucket/images/img-0-000001.jpg: access_denied (AccessDenied: Access Denied)"
    t0 = time.perf_counter()
    for _ in range(20_000):
        redact(line)
    per_call = (time.perf_counter() - t0) / 20_000
    assert per_call < 100e-6, f"{per_call * 1e6:.1f} us per call"
