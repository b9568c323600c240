//! `rafs-guest`: the in-guest helper. Its EROFS mount and fscache daemon arrive with the in-guest helper
//! issue; until then it only reports that, so nobody mistakes it for a working mount tool.

fn main() {
    eprintln!(
        "rafs-guest: the EROFS mount helper is not implemented yet (see the in-guest helper issue)"
    );
    std::process::exit(2);
}
