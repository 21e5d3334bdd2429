"""Where a store lives: a local directory, or a prefix of an object store (s3://, gs://, az://).

A local store keeps the format's fast paths (np.memmap of raw chunk files, an flock()ed writer
lock). A remote store is read and written through zarr's ObjectStore over obstore, and its other
objects (the tokenizer folder, the writer lease, raw chunk fetches) through obstore directly
(one client per location for each, built once): obstore read 2x the MiB/s of s3fs on the same
server (bench/remote_read.py), and it has conditional puts on every major backend, which the
writer lease needs.

Credentials and endpoint come from the standard environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, GOOGLE_APPLICATION_CREDENTIALS, ...) or from
`storage_options` (obstore config keys, e.g. {"endpoint": ..., "region": ...}).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from store.errors import StoreError

REMOTE_EXTRA = "pip install 'saeflow[s3]'"
_ENDPOINT_KEYS = ("endpoint", "aws_endpoint", "aws_endpoint_url", "endpoint_url")


class StoreLocation:
    """A store's address. str() is the address as the user wrote it (used in every message)."""

    def __init__(self, where: str | Path | StoreLocation, storage_options: Mapping[str, Any] | None = None):
        if isinstance(where, StoreLocation):
            where, storage_options = where.text, storage_options or where.options
        self.text = str(where)
        self.options = dict(storage_options or {})
        scheme, sep, rest = self.text.partition("://")
        self.local: Path | None = None
        if not sep:
            self.local = Path(self.text)
        elif scheme == "file":
            self.local = Path(rest)
        else:
            self.scheme = scheme
            self.bucket, _, prefix = rest.partition("/")
            self.prefix = prefix.strip("/")
            if not self.bucket or not self.prefix:
                raise StoreError(f"store URL {self.text!r} needs a bucket and a path, e.g. {scheme}://bucket/name.zarr")

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"StoreLocation({self.text!r})"

    @property
    def remote(self) -> bool:
        return self.local is None

    @property
    def name(self) -> str:
        return self.local.name if self.local is not None else self.prefix.rsplit("/", 1)[-1]

    def sibling(self, suffix: str) -> StoreLocation:
        """The address next to this one with `suffix` appended to its name (e.g. the lock)."""
        return StoreLocation(self.text.rstrip("/") + suffix, self.options)

    # --- zarr ---------------------------------------------------------------------------
    def zarr_store(self, read_only: bool) -> Any:
        """What zarr.open_group takes: the directory, or an ObjectStore on the store's prefix."""
        if self.local is not None:
            return str(self.local)
        from zarr.storage import ObjectStore

        return ObjectStore(self._prefix, read_only=read_only)

    # --- objects of a remote store (keys relative to the store) -------------------------
    # One client each for the life of this location: building one costs milliseconds (its HTTP
    # connection pool), and a client is safe to share between threads.
    @cached_property
    def _bucket(self) -> Any:
        return self._client(f"{self.scheme}://{self.bucket}")

    @cached_property
    def _prefix(self) -> Any:
        return self._client(f"{self.scheme}://{self.bucket}/{self.prefix}")

    def _obstore(self) -> Any:
        try:
            import obstore
        except ImportError:
            raise StoreError(f"{self.text} is on object storage, which needs obstore: {REMOTE_EXTRA}") from None
        return obstore

    def _client(self, url: str) -> Any:
        self._obstore()
        from obstore.store import from_url
        options = dict(self.options)
        endpoint = next((options[k] for k in _ENDPOINT_KEYS if k in options), None) or os.environ.get("AWS_ENDPOINT_URL")
        client = dict(options.pop("client_options", {}))
        if endpoint and str(endpoint).startswith("http://"):
            client.setdefault("allow_http", True)  # a local S3 server (MinIO, SeaweedFS) speaks plain http
        try:
            return from_url(url, client_options=client or None, **options)
        except Exception as error:  # noqa: BLE001 - obstore reports bad options as several types
            raise StoreError(f"cannot open {self.text}: {_first_line(error)}; fix generate.storage_options") from None

    def key(self, relative: str = "") -> str:
        return f"{self.prefix}/{relative}" if relative else self.prefix

    def read(self, relative: str) -> bytes | None:
        """The object's bytes; None if it does not exist."""
        obstore = self._obstore()

        try:
            return bytes(obstore.get(self._bucket, self.key(relative)).bytes())
        except FileNotFoundError as error:
            self._raise_if_no_bucket(error)
            return None
        except Exception as error:  # noqa: BLE001
            raise self.error(error) from None

    def write(self, relative: str, data: bytes) -> None:
        obstore = self._obstore()

        try:
            obstore.put(self._bucket, self.key(relative), data)
        except Exception as error:  # noqa: BLE001
            raise self.error(error) from None

    def create(self, relative: str, data: bytes) -> bool | None:
        """Write the object only if it does not exist: True if written, False if it existed, None
        if the backend has no conditional put (the caller decides what it can still promise)."""
        obstore = self._obstore()
        from obstore.exceptions import AlreadyExistsError, NotSupportedError, PreconditionError

        try:
            obstore.put(self._bucket, self.key(relative), data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False
        except NotSupportedError:
            return None
        except Exception as error:  # noqa: BLE001
            raise self.error(error) from None

    def delete(self, relative: str) -> None:
        obstore = self._obstore()

        try:
            obstore.delete(self._bucket, self.key(relative))
        except FileNotFoundError:
            pass
        except Exception as error:  # noqa: BLE001
            raise self.error(error) from None

    def size(self, relative: str) -> int | None:
        """The object's size in bytes; None if it does not exist."""
        obstore = self._obstore()

        try:
            return int(obstore.head(self._bucket, self.key(relative))["size"])
        except FileNotFoundError as error:
            self._raise_if_no_bucket(error)
            return None
        except Exception as error:  # noqa: BLE001
            raise self.error(error) from None

    def sizes(self, relative: str = "") -> dict[str, int]:
        """{key relative to the store: size} of every object under `relative` (a folder)."""
        obstore = self._obstore()

        folder = self.key(relative).rstrip("/") + "/"
        try:
            return {
                meta["path"][len(self.prefix) + 1 :]: int(meta["size"])
                for batch in obstore.list(self._bucket, prefix=folder)
                for meta in batch
            }
        except FileNotFoundError as error:
            self._raise_if_no_bucket(error)
            return {}
        except Exception as error:  # noqa: BLE001
            raise self.error(error) from None

    # --- both kinds ---------------------------------------------------------------------
    def is_empty(self) -> bool:
        """Nothing is stored at this address (no directory, an empty one, or no object)."""
        if self.local is not None:
            if self.local.exists() and not self.local.is_dir():
                raise StoreError(f"{self.local} is a file, not a store directory; choose another generate.store")
            return not self.local.exists() or not any(self.local.iterdir())
        return not self.sizes()

    def remove(self) -> None:
        """Delete everything stored at this address."""
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=False)
            return
        for relative in self.sizes():
            self.delete(relative)

    def error(self, error: BaseException) -> StoreError:
        """An object-store failure as one line naming the cause and the fix."""
        text = _first_line(error)
        if "NoSuchBucket" in str(error):
            return self._no_bucket()
        if any(code in str(error) for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")):
            return StoreError(
                f"access to {self.text} was denied ({text}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "or generate.storage_options")
        return StoreError(f"object store request for {self.text} failed ({text}); check the endpoint "
                          "(AWS_ENDPOINT_URL or generate.storage_options) and that the server is reachable")

    def _raise_if_no_bucket(self, error: BaseException) -> None:
        if "NoSuchBucket" in str(error):
            raise self._no_bucket() from None

    def _no_bucket(self) -> StoreError:
        return StoreError(f"bucket {self.bucket!r} of {self.text} does not exist; create it first "
                          f"(e.g. `aws s3 mb {self.scheme}://{self.bucket}`) or fix the store URL")


def locate(where: str | Path | StoreLocation, storage_options: Mapping[str, Any] | None = None) -> StoreLocation:
    """A StoreLocation for a path, URL or location (kept as it is when already one)."""
    if isinstance(where, StoreLocation) and storage_options is None:
        return where
    return StoreLocation(where, storage_options)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
