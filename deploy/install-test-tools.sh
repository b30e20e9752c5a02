#!/usr/bin/env bash
# Installs the real DICOM peers the tests use, from Debian packages: DCMTK (storescu,
# echoscu, dcmcjpeg...), Orthanc (a PACS), dicom3tools (dciodvfy), Chromium with its
# WebDriver (the status page test drives it headless with Selenium), redis-server (the
# Celery broker of the scale-out tests), buildah and mmdebstrap (the container image
# test). Needs root.
set -euo pipefail
missing=()
command -v /usr/bin/storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v /usr/sbin/Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v /usr/bin/dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v /usr/bin/redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v /usr/bin/buildah >/dev/null 2>&1 || missing+=(buildah)
command -v /usr/bin/mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v /usr/bin/chromium >/dev/null 2>&1 || missing+=(chromium)
command -v /usr/bin/chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run as root or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
