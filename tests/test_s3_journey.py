"""The classic Lambda example, end to end and unchanged: an image lands in bucket `uploads`; the function its S3
event runs reads it with `boto3.client("s3").get_object`, makes a thumbnail with Pillow and writes it to bucket
`thumbs` with `put_object`. The handler is plain Lambda code: no endpoint, no eventfn import; the workers'
environment (`AWS_ENDPOINT_URL_S3`, the region, the credentials) points boto3 at eventfn."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.s3_rig import Rig, running

pytestmark = pytest.mark.e2e

# The credentials are the function's own execution role (keys in its environment, made by the service); its policy
# reads the bucket its trigger names (the default) and writes thumbs/* (its [permissions]), and nothing else.
THUMBNAIL = """
    # /// eventfn
    # description = "Makes a thumbnail of each image put into uploads, in thumbs: the classic S3 example."
    # timeout = 30
    # triggers = [{ type = "bucket", bucket = "uploads", events = ["s3:ObjectCreated:*"], suffix = ".png" }]
    # retry = { max_attempts = 0 }
    # [permissions]
    # s3_write = ["thumbs/*"]
    # ///
    import io
    from urllib.parse import unquote_plus

    import boto3
    from botocore.exceptions import ClientError
    from PIL import Image

    s3 = boto3.client("s3")
    SIZE = (128, 128)


    def lambda_handler(event, context):
        for record in event["Records"]:
            bucket = record["s3"]["bucket"]["name"]
            key = unquote_plus(record["s3"]["object"]["key"])
            original = s3.get_object(Bucket=bucket, Key=key)
            with Image.open(io.BytesIO(original["Body"].read())) as image:
                image.thumbnail(SIZE)
                out = io.BytesIO()
                image.save(out, format="PNG")
            s3.put_object(Bucket="thumbs", Key=f"thumbnails/{key}", Body=out.getvalue(), ContentType="image/png",
                          Metadata={"source": f"{bucket}/{key}"})
            print(f"thumbnail of {bucket}/{key}: {image.size[0]}x{image.size[1]}")
            try:  # a bucket its policy does not name
                s3.put_object(Bucket="archive", Key=key, Body=b"")
                print("archive write: allowed")
            except ClientError as exc:
                print(f"archive write: {exc.response['Error']['Code']}")
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running(tmp_path_factory.mktemp("journey"), {"thumbnail": THUMBNAIL}, buckets=("thumbs", "archive")) as found:
        yield found


def test_an_image_put_into_uploads_gets_its_thumbnail_in_thumbs(rig: Rig) -> None:
    photo = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 60)).save(photo, format="PNG")
    s3 = rig.client()
    s3.put_object(Bucket="uploads", Key="photos/red flower.png", Body=photo.getvalue(), ContentType="image/png")

    report = rig.service.log.wait_for(r"REPORT RequestId: \S+\tFunction: thumbnail\t.*Status: (\w+)", timeout=60)
    assert report.group(1) == "ok", "\n".join(rig.service.log.lines[-40:])
    thumb = s3.get_object(Bucket="thumbs", Key="thumbnails/photos/red flower.png")
    assert thumb["ContentType"] == "image/png"
    assert thumb["Metadata"] == {"source": "uploads/photos/red flower.png"}
    with Image.open(io.BytesIO(thumb["Body"].read())) as image:
        assert image.size == (128, 96) and image.getpixel((64, 48)) == (200, 30, 60)
    # 4. Its role is refused a write to a bucket its policy does not name, and nothing lands there.
    assert rig.service.log.wait_for(r"archive write: (\w+)", timeout=10).group(1) == "AccessDenied"
    assert not any((rig.root / "archive").iterdir())
