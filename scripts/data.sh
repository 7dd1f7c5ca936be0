#!/usr/bin/env bash
# Installs the real images that ship inside Debian packages (../shared/DATA.md): Colin27 + atlases
# (mricron-data), the ITK KmeansTest subject (insighttoolkit5-examples) and the InVesalius head CT
# (invesalius-examples). The pip-installed data (nilearn, pydicom-data) comes with requirements-dev.txt.
# Best effort: without root or apt the tests that need these files skip with a clear reason.
set -uo pipefail
PKGS=(mricron-data insighttoolkit5-examples invesalius-examples)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "medfast data: cannot install ${missing[*]} (not root); tests that need them will skip" >&2; exit 0
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "medfast data: no apt-get; ${missing[*]} not installed; tests that need them will skip" >&2; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null 2>&1
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    echo "medfast data: apt-get install ${missing[*]} failed; tests that need them will skip" >&2
}
exit 0
