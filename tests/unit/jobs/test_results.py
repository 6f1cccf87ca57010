"""The result store (folder and S3 on moto) and reading input locations (file and S3)."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from twinserve.errors import NotFoundError, PayloadTooLargeError, ServerError, ValidationError
from twinserve.jobs import s3 as jobs_s3
from twinserve.jobs.results import ResultStore, check_inference_id, open_results, read_input

BUCKET = "twin-results"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's S3 with fake credentials and one bucket; the process's client made inside it."""
    from moto import mock_aws

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with mock_aws():
        jobs_s3.reset_default_client()
        client = jobs_s3.s3_client()
        client.create_bucket(Bucket=BUCKET)
        yield client
    jobs_s3.reset_default_client()


def _race(store: ResultStore, inference_id: str, writers: int = 16) -> tuple[set[str], list[bytes]]:
    """`writers` threads put different bodies for one id at the same moment; each reads the
    answer back right after its put, and all must have read the same one (an overwrite by a
    later writer would show as two answers)."""
    barrier = threading.Barrier(writers)
    locations: list[str] = []
    seen: list[bytes] = []
    bodies = [f"answer {i} ".encode() * 1000 for i in range(writers)]

    def put(body: bytes) -> None:
        barrier.wait()
        location = store.put_success(inference_id, body, "text/plain")
        seen.append(store.get(location))
        locations.append(location)

    threads = [threading.Thread(target=put, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(locations) == writers
    assert len(set(seen)) == 1, "a later put changed the answer"
    return set(locations), bodies


# --- the folder store -------------------------------------------------------------------------


def test_file_store_locations_and_roundtrip(tmp_path: Path) -> None:
    store = open_results(f"file://{tmp_path}/results")
    expected = f"file://{tmp_path}/results/abc.out"
    assert store.location_for("abc") == expected
    assert store.location_for("abc", failed=True) == f"file://{tmp_path}/results/failures/abc.error"
    assert not (tmp_path / "results").exists()  # nothing is made before the first write
    assert store.put_success("abc", b'{"generated_text": "hi"}', "application/json") == expected
    assert store.get(expected) == b'{"generated_text": "hi"}'
    assert store.exists(expected)
    failure = store.put_failure("abc", b'{"error": "boom"}')
    assert failure == store.location_for("abc", failed=True)
    assert store.get(failure) == b'{"error": "boom"}'
    assert not store.exists(store.location_for("other"))
    with pytest.raises(NotFoundError):
        store.get(store.location_for("other"))


def test_plain_path_and_separate_failure_location(tmp_path: Path) -> None:
    store = open_results(str(tmp_path / "ok"), failure_location=f"file://{tmp_path}/bad")
    assert store.put_failure("id1", b"x") == f"file://{tmp_path}/bad/id1.error"
    assert (tmp_path / "bad" / "id1.error").read_bytes() == b"x"
    assert store.put_success("id1", b"y") == f"file://{tmp_path}/ok/id1.out"
    assert store.delete_prefix() == 2
    assert not store.exists(store.location_for("id1"))


def test_folder_with_a_space_in_its_name(tmp_path: Path) -> None:
    store = open_results(str(tmp_path / "my results"))
    location = store.put_failure("x", b"e")
    assert location == (tmp_path / "my results" / "failures" / "x.error").as_uri()
    assert "%20" in location and store.get(location) == b"e"


def test_second_put_keeps_the_first_answer(tmp_path: Path) -> None:
    store = open_results(str(tmp_path))
    first = store.put_success("job", b"first")
    assert store.put_success("job", b"second") == first
    assert store.get(first) == b"first"
    assert store.put_failure("job", b"e1") == store.put_failure("job", b"e2")
    assert store.get(store.location_for("job", failed=True)) == b"e1"


@pytest.mark.parametrize("hard_links", [True, False], ids=["link", "lock-fallback"])
def test_racing_writers_leave_one_whole_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    if not hard_links:

        def no_link(src: Any, dst: Any, **_: Any) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    store = open_results(str(tmp_path))
    locations, bodies = _race(store, "raced")
    assert locations == {store.location_for("raced")}
    assert store.get(store.location_for("raced")) in bodies  # one writer's body, whole
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("raced.out", ".lock")]
    assert leftovers == []  # no temporary file survives


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-x", "a b", "x" * 201, "é"])
def test_unsafe_inference_ids_are_refused(tmp_path: Path, bad: str) -> None:
    store = open_results(str(tmp_path))
    with pytest.raises(ValidationError):
        store.put_success(bad, b"x")
    with pytest.raises(ValidationError):
        store.location_for(bad)
    assert check_inference_id("0f3a-b_c.d") == "0f3a-b_c.d"


def test_locations_outside_the_store_are_refused(tmp_path: Path) -> None:
    store = open_results(str(tmp_path / "r"))
    for foreign in (f"file://{tmp_path}/other/x.out", f"file://{tmp_path}/r/../x.out", "s3://b/x.out"):
        with pytest.raises(ValidationError):
            store.get(foreign)
    with pytest.raises(ValidationError):
        open_results("ftp://host/results")


# --- the S3 store on moto ---------------------------------------------------------------------


def test_s3_store_is_write_once(s3: Any) -> None:
    store = open_results(f"s3://{BUCKET}/async/out")
    location = store.put_success("inf-1", b'{"ok": true}', "application/json")
    assert location == f"s3://{BUCKET}/async/out/inf-1.out" == store.location_for("inf-1")
    assert store.put_success("inf-1", b"overwrite?") == location
    assert store.get(location) == b'{"ok": true}'
    head = s3.head_object(Bucket=BUCKET, Key="async/out/inf-1.out")
    assert head["ContentType"] == "application/json"
    failure = store.put_failure("inf-2", b'{"error": "x"}')
    assert failure == f"s3://{BUCKET}/async/out/failures/inf-2.error"
    assert store.exists(failure) and not store.exists(store.location_for("inf-3"))
    with pytest.raises(NotFoundError):
        store.get(store.location_for("inf-3"))
    assert store.delete_prefix() == 2
    assert not store.exists(location)
    with pytest.raises(ValidationError, match="root"):
        open_results(f"s3://{BUCKET}").delete_prefix()


def test_s3_failure_path_and_concurrent_puts(s3: Any) -> None:
    store = open_results(f"s3://{BUCKET}/out", failure_location=f"s3://{BUCKET}/errors/")
    assert store.location_for("j", failed=True) == f"s3://{BUCKET}/errors/j.error"
    locations, bodies = _race(store, "j", writers=4)
    assert locations == {f"s3://{BUCKET}/out/j.out"}
    assert store.get(f"s3://{BUCKET}/out/j.out") in bodies


def test_s3_store_without_conditional_writes_falls_back(s3: Any) -> None:
    """An S3-compatible store answering 501 to If-None-Match: HEAD then PUT, still write-once."""
    from botocore.exceptions import ClientError

    def refuse_conditional(params: dict[str, Any], **_: Any) -> None:
        if "IfNoneMatch" in params:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}}, "PutObject")

    s3.meta.events.register("provide-client-params.s3.PutObject", refuse_conditional)
    store = open_results(f"s3://{BUCKET}/compat")
    first = store.put_success("a", b"one")
    assert store.put_success("a", b"two") == first
    assert store.get(first) == b"one"


def _fail_conditional_puts(client: Any, code: str, times: int) -> list[int]:
    """Make the next `times` conditional PutObjects answer `code` (moto never answers 409)."""
    from botocore.exceptions import ClientError

    calls: list[int] = []

    def fail(params: dict[str, Any], **_: Any) -> None:
        if "IfNoneMatch" in params:
            calls.append(1)
            if len(calls) <= times:
                raise ClientError({"Error": {"Code": code, "Message": "injected"}}, "PutObject")

    client.meta.events.register("provide-client-params.s3.PutObject", fail)
    return calls


def test_s3_conflict_while_another_put_is_in_flight(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_s3.time, "sleep", lambda _: None)
    store = open_results(f"s3://{BUCKET}/conflict")
    calls = _fail_conditional_puts(s3, "ConditionalRequestConflict", times=2)
    assert store.put_success("a", b"mine") == f"s3://{BUCKET}/conflict/a.out"
    assert len(calls) == 3 and store.get(f"s3://{BUCKET}/conflict/a.out") == b"mine"
    # the other writer keeps the key busy, then its object is there: settled by reading
    s3.put_object(Bucket=BUCKET, Key="conflict/b.out", Body=b"theirs")
    _fail_conditional_puts(s3, "ConditionalRequestConflict", times=100)
    assert store.put_success("b", b"mine") == f"s3://{BUCKET}/conflict/b.out"
    assert store.get(f"s3://{BUCKET}/conflict/b.out") == b"theirs"


def test_missing_bucket_is_not_found_to_readers_and_a_server_error_to_writers(s3: Any) -> None:
    store = open_results("s3://no-such-bucket-here/p")
    with pytest.raises(NotFoundError):
        store.get(store.location_for("x"))
    with pytest.raises(ServerError) as info:
        store.put_success("x", b"y")
    assert info.value.status_code == 500


# --- input locations --------------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "req.json").write_bytes(b'{"inputs": "hi"}')
    (tmp_path / "secret.txt").write_bytes(b"do not read")
    return root


def test_read_file_input_inside_the_allowed_root(inputs: Path) -> None:
    url = f"file://{inputs}/req.json"
    assert read_input(url, limit_bytes=100, allowed_roots=[inputs]) == b'{"inputs": "hi"}'
    assert read_input(url.replace("req", "r%65q"), limit_bytes=100, allowed_roots=[str(inputs)])
    with pytest.raises(NotFoundError):
        read_input(f"file://{inputs}/missing.json", limit_bytes=100, allowed_roots=[inputs])


@pytest.mark.parametrize(
    "template",
    [
        "file://{root}/../secret.txt",
        "file://{root}/%2e%2e/secret.txt",
        "file://{root}/sub/../../secret.txt",
        "file://{parent}/secret.txt",
        "file://{root}/link-out",  # a symlink inside the root pointing outside
        "file:secret.txt",
        "file://evil.example{root}/req.json",
        "file://{root}/req.json?x=1",
        "{root}/req.json",
        "http://127.0.0.1/req.json",
        "file://{root}/req.json%00.txt",
    ],
)
def test_file_inputs_outside_the_roots_are_refused(inputs: Path, template: str) -> None:
    (inputs / "link-out").symlink_to(inputs.parent / "secret.txt")
    url = template.format(root=inputs, parent=inputs.parent)
    with pytest.raises(ValidationError) as info:
        read_input(url, limit_bytes=1000, allowed_roots=[inputs])
    assert info.value.status_code == 422
    assert "do not read" not in info.value.message


def test_file_inputs_are_off_without_roots_and_only_regular_files(inputs: Path) -> None:
    with pytest.raises(ValidationError, match="not enabled"):
        read_input(f"file://{inputs}/req.json", limit_bytes=100)
    with pytest.raises(ValidationError, match="regular file"):
        read_input(f"file://{inputs}", limit_bytes=100, allowed_roots=[inputs])
    os.mkfifo(inputs / "pipe")  # opening it for reading must not wait for a writer
    with pytest.raises(ValidationError, match="regular file"):
        read_input(f"file://{inputs}/pipe", limit_bytes=100, allowed_roots=[inputs])


def test_file_input_over_the_limit_is_413(inputs: Path) -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        read_input(f"file://{inputs}/req.json", limit_bytes=5, allowed_roots=[inputs])
    assert info.value.status_code == 413
    body = (inputs / "req.json").read_bytes()
    assert read_input(f"file://{inputs}/req.json", limit_bytes=len(body), allowed_roots=[inputs]) == body


def test_read_s3_input(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="in/req.json", Body=b'{"inputs": "x"}')
    url = f"s3://{BUCKET}/in/req.json"
    assert read_input(url, limit_bytes=100) == b'{"inputs": "x"}'
    with pytest.raises(PayloadTooLargeError):
        read_input(url, limit_bytes=3)
    with pytest.raises(NotFoundError):
        read_input(f"s3://{BUCKET}/in/missing.json", limit_bytes=100)
    with pytest.raises(NotFoundError):
        read_input("s3://no-such-bucket-here/k", limit_bytes=100)
    with pytest.raises(ValidationError, match="bucket"):
        read_input(url, limit_bytes=100, allowed_buckets={"another-bucket"})
    for bad in (f"s3://{BUCKET}", f"s3://{BUCKET}/in/", "s3://B_ad/key", "s3:///key"):
        with pytest.raises(ValidationError):
            read_input(bad, limit_bytes=100)
