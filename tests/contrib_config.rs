//! The sample configuration shipped in `contrib/` is valid and says what
//! it claims.

use tidings::config::FileConfig;

#[test]
fn the_sample_config_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/tidingsd.toml");
    let c = FileConfig::load(&path).unwrap().to_server_config();
    assert_eq!(c.listen.to_string(), "0.0.0.0:7420");
    assert_eq!(c.public_addr.as_deref(), Some("chat.example.org:7420"));
    assert_eq!(c.data_dir.to_str(), Some("/var/lib/tidings"));
}
