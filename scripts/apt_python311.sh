#!/usr/bin/env bash
# Python 3.11 from the deadsnakes PPA on the Ubuntu 22.04 CUDA base images, with the packages
# named as arguments, in one layer: the Dockerfile's builder and runtime stages both run it
#   RUN --mount=type=bind,source=scripts/apt_python311.sh,target=/tmp/apt_python311.sh \
#       bash /tmp/apt_python311.sh <package> ...
# The tools that add the PPA are purged again and the package lists removed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
ppa_tools=(software-properties-common gpg-agent)
apt-get update
apt-get install -y --no-install-recommends "${ppa_tools[@]}"
add-apt-repository -y ppa:deadsnakes/ppa
apt-get update
apt-get install -y --no-install-recommends \
    python3.11 python3.11-venv python3.11-dev ca-certificates "$@"
apt-get purge -y "${ppa_tools[@]}"
apt-get autoremove -y
rm -rf /var/lib/apt/lists/*
