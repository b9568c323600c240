# shellcheck shell=bash
# The private apt world the guest kernel scripts download with: its own source list (bookworm-backports,
# signed by Debian's archive keyring), package lists, caches and (empty) preferences, so /etc/apt is never
# read or written and nothing is installed on the host.
#
# Usage: . ci/lib/private-apt.sh; private_apt WHO DIR
# Sets apt_dir (DIR/apt, created with its lists, cache and download folders) and apt_opts (the apt-get and
# apt-cache options that select it). WHO prefixes the error message when the keyring is missing.
# The mirror is $RAFSD_GUEST_MIRROR, default http://deb.debian.org/debian.

private_apt() {
    local who=$1
    apt_dir=$2/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/download"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || { echo "$who: $keyring missing (package debian-archive-keyring)" >&2; exit 1; }
    local mirror=${RAFSD_GUEST_MIRROR:-http://deb.debian.org/debian}
    echo "deb [signed-by=$keyring] $mirror bookworm-backports main" >"$apt_dir/sources.list"
    # shellcheck disable=SC2034 # read by the scripts that source this file
    apt_opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=/dev/null"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "APT::Get::List-Cleanup=false"
        -o "Acquire::Languages=none"
        -o "Acquire::Retries=3"
    )
}
