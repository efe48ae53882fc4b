#!/usr/bin/env bash
# Bootstrap a fresh machine for `make test` / `make demo`: Debian packages (as root, when missing), a venv, pip.
# Idempotent and quiet when everything is already there.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
# Key stores for the PKCS#11 tests: SoftHSM2, NSS softoken, p11-kit's proxy, a software TPM behind tpm2-pkcs11
# (swtpm, tpm2-abrmd on a private dbus-daemon, the tabrmd and swtpm TCTIs) and OpenSC's pkcs11-tool.
# systemd: systemd-analyze verify. zsh and fish: running the completion scripts they are given.
DEB_PACKAGES=(softhsm2 libnss3 libnss3-tools p11-kit p11-kit-modules
              swtpm libtpm2-pkcs11-1 tpm2-abrmd libtss2-tcti-tabrmd0 libtss2-tcti-swtpm0 dbus-daemon opensc
              systemd zsh fish)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: WARNING: missing Debian packages (${missing[*]}); run as root or install them." >&2
    echo "bootstrap: PKCS#11 tests will be skipped locally and fail under CI=true." >&2
  fi
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "bootstrap: installing signing-agent[dev] into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
