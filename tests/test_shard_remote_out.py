"""``ecomaug shard INPUT s3://...``: shards written through a local staging folder into object storage
(a local moto S3 server), read back from the bucket, resumed after a crash, refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import loaders
from ecomaug.cli import main as cli
from loaders.convert import convert_to_shards
from loaders.convert.remote_out import STAGING_MARK, RemoteOut, default_staging, open_remote_out
from loaders.manifest import load_shard_set

PHOTOS = 10  # plus a copy of photo 0 (a duplicate) and a file that is not an image


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for number in range(PHOTOS):
        small = np.random.default_rng(number).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48)).save(root / f"img-{number:03d}.jpg", "JPEG", quality=90)
    shutil.copy(root / "img-000.jpg", root / "zz-copy.jpg")
    (root / "zz-broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture
def bucket(s3_client, tmp_path):
    """An empty bucket on the local server (tests/conftest.py): (its s3:// URL, a boto3 client, its name)."""
    name = f"out-{tmp_path.name.lower().replace('_', '-')}"[:60]
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}", s3_client, name


def stored(client, name: str, prefix: str = "") -> dict[str, int]:
    """Key -> size of every object in the bucket under ``prefix``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def convert(photos, url, staging, **options):
    return convert_to_shards(photos, url, shard_size=3, workers=0, progress=False, staging=staging, **options)


def read_back(url: str) -> list[str]:
    """Every key the PyTorch loader streams from the shard set at ``url``, on CPU, in order."""
    loader = loaders.build_loader(f"{url}/", backend="torch", device="cpu", batch_size=4, crop_size=32,
                                  num_workers=0, mode="eval")
    return [key for batch in loader for key in batch.keys]


def check_complete(client, name: str, url: str) -> list[str]:
    """The bucket holds exactly the manifest's shards, indexes, skipped.jsonl and manifest.json, and
    the loader reads every written sample once; returns the keys read."""
    manifest = json.loads(client.get_object(Bucket=name, Key="shards/manifest.json")["Body"].read())
    expected = {f"shards/{entry[kind]}" for entry in manifest["shards"] for kind in ("tar", "index")}
    expected |= {"shards/manifest.json", "shards/skipped.jsonl"}
    objects = stored(client, name)
    assert set(objects) == expected
    assert all(objects[f"shards/{entry['tar']}"] == entry["bytes"] for entry in manifest["shards"])
    skipped = client.get_object(Bucket=name, Key="shards/skipped.jsonl")["Body"].read().decode().splitlines()
    totals = manifest["totals"]
    assert totals["inputs"] == PHOTOS + 2 == totals["written"] + totals["skipped"] and len(skipped) == totals["skipped"]
    keys = read_back(url)
    assert len(keys) == len(set(keys)) == totals["written"] == PHOTOS
    return keys


def test_a_conversion_into_s3_is_read_back_from_the_bucket(photos, bucket, tmp_path):
    url, client, name = bucket
    staging = tmp_path / "staging"
    report = convert(photos, f"{url}/shards", staging)
    assert report.out_dir == f"{url}/shards" and report.manifest_path == f"{url}/shards/manifest.json"
    assert (report.written, report.skipped, report.shards) == (PHOTOS, 2, 4)
    assert report.skipped_by_reason == {"duplicate bytes": 1, "not an image": 1}
    keys = check_complete(client, name, f"{url}/shards")
    assert [shard.count for shard in load_shard_set(f"{url}/shards").shards] == [3, 3, 3, 1]
    assert not staging.exists()  # each shard was removed once uploaded; the emptied folder too
    local = convert_to_shards(photos, tmp_path / "local", shard_size=3, workers=0, progress=False)
    assert keys == read_back(str(tmp_path / "local"))  # the same shard set as a local OUT_DIR
    assert local.written == report.written


def test_a_rerun_after_completion_is_already_complete_and_uploads_nothing(photos, bucket, tmp_path, monkeypatch):
    url, client, name = bucket
    out = f"{url}/shards"
    convert(photos, out, tmp_path / "staging")
    before = {item["Key"]: item["LastModified"] for item in client.list_objects_v2(Bucket=name)["Contents"]}

    def no_upload(*args, **kwargs):
        raise AssertionError("uploaded on a run after completion")

    monkeypatch.setattr(RemoteOut, "_upload", no_upload)
    monkeypatch.setattr(RemoteOut, "start", no_upload)
    result = CliRunner().invoke(cli, ["shard", str(photos), out, "--staging", str(tmp_path / "staging"),
                                      "--shard-size", "3", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"already complete: {out}/manifest.json ({PHOTOS} written, 2 skipped)" in result.output
    assert {item["Key"]: item["LastModified"] for item in client.list_objects_v2(Bucket=name)["Contents"]} == before


@pytest.mark.parametrize("crash", ["before the upload", "in the middle of the upload"])
def test_a_run_that_crashed_after_the_first_shard_resumes_into_a_complete_bucket(photos, bucket, tmp_path,
                                                                                 monkeypatch, crash):
    url, client, name = bucket
    out, staging = f"{url}/shards", tmp_path / "staging"
    real = RemoteOut.shard_closed
    calls = []

    def crashing(self, folder, shard):
        calls.append(shard["tar"])
        if len(calls) == 2:
            if crash == "in the middle of the upload":  # a torn object where the second shard goes
                self.fs.pipe_file(f"{self.root}/{shard['tar']}", b"torn")
            raise RuntimeError("simulated crash")
        real(self, folder, shard)

    monkeypatch.setattr(RemoteOut, "shard_closed", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(photos, out, staging)
    assert "shards/shard-000000.tar" in stored(client, name) and "shards/manifest.json" not in stored(client, name)
    assert (staging / ".convert-journal.jsonl").exists()
    monkeypatch.setattr(RemoteOut, "shard_closed", real)
    report = convert(photos, out, staging)
    assert report.resumed and report.processed < PHOTOS + 2 and (report.written, report.skipped) == (PHOTOS, 2)
    check_complete(client, name, out)
    assert not staging.exists()


def test_split_jobs_and_a_validation_split_write_one_readable_set(photos, bucket, tmp_path):
    url, client, name = bucket
    jobs = [convert(photos, f"{url}/shards", tmp_path / "staging", num_jobs=2, job_index=index) for index in (0, 1)]
    assert {"shards/manifest-j000.json", "shards/manifest-j001.json"} <= set(stored(client, name))
    assert sum(job.written + job.skipped for job in jobs) == PHOTOS + 2  # duplicates are found within a job
    keys = read_back(f"{url}/shards")
    assert len(keys) == len(set(keys)) == sum(job.written for job in jobs)
    listing = tmp_path / "items.csv"  # the split holds out whole items: one per photo here
    listing.write_text("path,item_id\n" + "".join(f"{photos / f'img-{n:03d}.jpg'},item{n}\n" for n in range(PHOTOS)))
    report = convert(listing, f"{url}/split", tmp_path / "staging-split", val_split=0.3)
    assert report.val is not None and report.val.out_dir == f"{url}/split/val"
    assert "split/val/manifest.json" in stored(client, name, "split/")
    assert report.written + report.val.written == PHOTOS


def test_a_missing_bucket_is_one_error_line_and_converts_nothing(photos, bucket, tmp_path):
    result = CliRunner().invoke(cli, ["shard", str(photos), "s3://no-such-bucket-here/shards", "--staging",
                                      str(tmp_path / "staging"), "--workers", "0", "--no-progress"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("staging in ") and len(lines) == 2, result.output
    assert lines[1].startswith("Error: s3://no-such-bucket-here/shards: cannot write to the object store")
    assert "bucket does not exist" in lines[1]
    assert not list((tmp_path / "staging").glob("*.tar"))


def test_missing_credentials_are_one_error_line(photos, bucket, tmp_path, monkeypatch):
    import fsspec

    url, _, _ = bucket
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    result = CliRunner().invoke(cli, ["shard", str(photos), f"{url}/shards", "--staging", str(tmp_path / "staging"),
                                      "--workers", "0", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1] == (f"Error: {url}/shards: cannot list the object store "
                                              f"(NoCredentialsError: Unable to locate credentials)")


def test_shards_of_another_run_in_the_bucket_are_refused(photos, bucket, tmp_path):
    url, client, name = bucket
    client.put_object(Bucket=name, Key="shards/shard-000000.tar", Body=b"someone else's")
    with pytest.raises(ValueError, match="already holds shards named shard-"):
        convert(photos, f"{url}/shards", tmp_path / "staging")
    assert stored(client, name) == {"shards/shard-000000.tar": len(b"someone else's")}


def test_staging_is_checked_before_anything_is_written(tmp_path, photos):
    with pytest.raises(ValueError, match="--staging is for an object-storage OUT"):
        convert(photos, tmp_path / "local", tmp_path / "staging")
    with pytest.raises(ValueError, match="can only be read"):
        open_remote_out("https://example.com/shards", tmp_path / "staging")
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / STAGING_MARK).write_text("memory://elsewhere\n")
    with pytest.raises(ValueError, match="holds a conversion into memory://elsewhere"):
        open_remote_out("memory://here", marked)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        open_remote_out("memory://here", tmp_path / "busy")
    assert default_staging("s3://b/p/") == default_staging("s3://b/p") != default_staging("s3://b/q")


def test_a_missing_store_package_names_the_extra(tmp_path):
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ImportError, match=r"writing to gs:// needs gcsfs: pip install 'ecomaug\[gcs\]'"):
        open_remote_out("gs://bucket/shards", tmp_path / "staging")
