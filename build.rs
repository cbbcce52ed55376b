//! Rebuilds when a migration is added or changed: `sqlx::migrate!` embeds the folders at compile
//! time, and cargo does not notice a new file in them by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
