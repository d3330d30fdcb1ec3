// `sqlx::migrate!` embeds migrations/ at compile time; without this, adding a migration file
// (and changing no Rust code) would build a binary that silently lacks it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
