"""The aiohttp Cloud Storage adapter against a real fake-gcs-server process."""

from __future__ import annotations

import pytest

from captioner.adapters.storage import StorageClient, endpoint_from_env, object_path
from captioner.errors import ObjectGoneError, PermanentError, TransientError

ODD_NAMES = [
    "plain.jpg",
    "with space.jpg",
    "hash#tag.jpg",
    "question?.jpg",
    "percent%20literal.jpg",
    "folder/sub folder/deep.jpg",
    "ünïcødé/日本語の写真.jpg",
    "emoji 🐈.jpg",
    "plus+and&amp=.jpg",
]


def test_object_path_encodes_every_reserved_character() -> None:
    assert object_path("b", "a/b#c?d%e f") == "/b/b/o/a%2Fb%23c%3Fd%25e%20f"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("https://storage.googleapis.com", False)),
        ("localhost:9023", ("http://localhost:9023", True)),
        ("http://127.0.0.1:1/", ("http://127.0.0.1:1", True)),
    ],
)
def test_emulator_host_is_honoured_like_google_cloud_storage(
    value: str, expected: tuple[str, bool]
) -> None:
    assert endpoint_from_env({"STORAGE_EMULATOR_HOST": value}) == expected


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_odd_object_names_round_trip(
    bucket, storage_client: StorageClient, name: str
) -> None:  # type: ignore[no-untyped-def]
    blob = bucket.blob(name)
    blob.metadata = {"owner": "alice"}
    blob.upload_from_string(b"bytes of " + name.encode(), content_type="image/jpeg")

    info = await storage_client.get_object(bucket.name, name)
    assert info.name == name
    assert info.metadata == {"owner": "alice"}
    data = await storage_client.download(
        bucket.name, name, generation=info.generation, max_bytes=1000
    )
    assert data == b"bytes of " + name.encode()
    await storage_client.patch_metadata(
        bucket.name,
        name,
        {"caption": "hi"},
        if_generation_match=info.generation,
        if_metageneration_match=info.metageneration,
    )
    blob.reload()
    assert blob.metadata == {"owner": "alice", "caption": "hi"}


async def test_missing_object_is_gone(bucket, storage_client: StorageClient) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ObjectGoneError):
        await storage_client.get_object(bucket.name, "nope.jpg")


async def test_download_refuses_more_than_the_limit(bucket, storage_client: StorageClient) -> None:  # type: ignore[no-untyped-def]
    bucket.blob("big.bin").upload_from_string(b"x" * 5000)
    info = await storage_client.get_object(bucket.name, "big.bin")
    with pytest.raises(PermanentError, match="CAPTION_MAX_BYTES"):
        await storage_client.download(
            bucket.name, "big.bin", generation=info.generation, max_bytes=4999
        )


async def test_download_of_a_replaced_generation_is_gone(
    bucket, storage_client: StorageClient
) -> None:  # type: ignore[no-untyped-def]
    blob = bucket.blob("v.jpg")
    blob.upload_from_string(b"one")
    old = await storage_client.get_object(bucket.name, "v.jpg")
    blob.upload_from_string(b"two")
    with pytest.raises(ObjectGoneError):
        await storage_client.download(
            bucket.name, "v.jpg", generation=old.generation, max_bytes=100
        )


async def test_listing_pages_through_a_prefix(bucket, storage_client: StorageClient) -> None:  # type: ignore[no-untyped-def]
    for i in range(7):
        bucket.blob(f"p/{i}.jpg").upload_from_string(b"x")
    bucket.blob("other/x.jpg").upload_from_string(b"x")
    names = [o.name async for o in storage_client.list_objects(bucket.name, "p/", page_size=3)]
    assert sorted(names) == [f"p/{i}.jpg" for i in range(7)]


async def test_unreachable_storage_is_transient() -> None:
    import aiohttp

    from captioner_dev.gcs import free_port

    async with aiohttp.ClientSession() as session:
        client = StorageClient(
            session, endpoint=f"http://127.0.0.1:{free_port()}", emulator=True, attempts=2
        )
        with pytest.raises(TransientError):
            await client.get_object("b", "n")
