#!/usr/bin/env bash
# Fetches ONNX Runtime's C/C++ headers into OUT_DIR/include/onnxruntime without installing anything:
# Debian 13's libonnxruntime-dev .deb, downloaded by apt-get under a private APT_CONFIG whose only source is the
# system's own Debian mirror with the suite changed to trixie (the system's apt state is not touched), checked against
# a pinned sha256 and unpacked with dpkg -x. Its headers (C API 21) run against the newer library of the onnxruntime
# wheel, which the runtime loads with dlopen.
set -euo pipefail
out=${1:?usage: fetch-onnxruntime-headers.sh OUT_DIR}
deb=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
sha256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08

if [ "$(dpkg --print-architecture)" != amd64 ]; then
  echo "fetch-onnxruntime-headers: the pinned $deb is for amd64; this machine is $(dpkg --print-architecture)" >&2
  exit 1
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ ! -f "$out/$deb" ] || ! echo "$sha256  $out/$deb" | sha256sum --check --status; then
  apt_dir=$(mktemp -d)
  trap 'rm -rf "$apt_dir"' EXIT
  mkdir -p "$apt_dir"/{sources,preferences,lists/partial,cache/archives/partial,state}
  # The system's Debian source (deb822 or one-line format), suite changed to trixie.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk 'BEGIN { RS = ""; ORS = "\n\n" } /URIs:[^\n]*\/debian\/?(\n|$)/ { print; exit }' \
      /etc/apt/sources.list.d/debian.sources | sed -E 's/^Suites:.*/Suites: trixie/' > "$apt_dir/sources/trixie.sources"
  fi
  if [ ! -s "$apt_dir/sources/trixie.sources" ]; then
    rm -f "$apt_dir/sources/trixie.sources"
    line=$(grep -hE '^deb +(\[[^]]*\] +)?[a-z]+://[^ ]*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
             2>/dev/null | head -n1 || true)
    [ -n "$line" ] || { echo "fetch-onnxruntime-headers: no Debian source in /etc/apt to derive trixie's from" >&2; exit 1; }
    echo "$line" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /:\/\//) { $(i + 1) = "trixie"; print; exit } }' \
      > "$apt_dir/sources/trixie.list"
  fi
  cat > "$apt_dir/apt.conf" <<CONF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$apt_dir/sources";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$apt_dir/preferences";
Dir::State "$apt_dir/state";
Dir::State::Lists "$apt_dir/lists";
Dir::State::status "/dev/null";
Dir::Cache "$apt_dir/cache";
APT::Sandbox::User "root";
CONF
  export APT_CONFIG="$apt_dir/apt.conf"
  apt-get update -qq
  (cd "$apt_dir" && apt-get download -qq libonnxruntime-dev=1.21.0+dfsg-1)
  if ! echo "$sha256  $apt_dir/$deb" | sha256sum --check --status; then
    echo "fetch-onnxruntime-headers: $deb does not have the pinned sha256 $sha256" >&2
    exit 1
  fi
  mv "$apt_dir/$deb" "$out/$deb"
fi
rm -rf "$out/root"
dpkg -x "$out/$deb" "$out/root"
mkdir -p "$out/include"
rm -rf "$out/include/onnxruntime"
mv "$out/root/usr/include/onnxruntime" "$out/include/onnxruntime"
rm -rf "$out/root"
echo "ONNX Runtime headers (Debian 13 libonnxruntime-dev 1.21.0) in $out/include/onnxruntime"
