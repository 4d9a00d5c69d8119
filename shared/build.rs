// The migrations are embedded at build time (`sqlx::migrate!`): rebuild when one is added.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
