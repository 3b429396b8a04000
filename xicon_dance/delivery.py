"""Result delivery: bucket upload with a presigned URL, or inline base64. OWNER: core-run helper.

Contract:
- ``await deliver(path: Path, *, job_id: str, mode: "auto"|"url"|"base64", settings) -> dict`` returning
  ``{"url"|"base64": ..., "filename", "content_type": "video/mp4", "bytes"}``.
  Bucket (when BUCKET_ENDPOINT_URL + keys are set): multipart upload, ContentType video/mp4, key
  ``<prefix>/<job_id>/<file>.mp4``, presigned GET with settings.presign_expiry_s, retries on transient
  errors; failure -> ``DeliveryError``. base64 only under settings.max_base64_output_bytes, else a
  ``DeliveryError`` telling the caller to configure a bucket. ``mode="url"`` without a bucket -> error.
"""
