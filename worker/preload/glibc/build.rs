//! Link flags of the preload library.

fn main() {
    // Never unloaded: its publishing thread runs code of this object until
    // the process ends, so a dlclose must not unmap it.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
