//! A new user with no repos.yaml anywhere gets pcocc's stock repository `user` in
//! `~/.pcocc/images`, created on first use, so the tool works with no set-up.

use std::process::Command;

#[test]
fn with_no_configuration_the_user_repository_is_created_in_the_home_directory() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let empty = dir.path().join("empty-conf");
    std::fs::create_dir(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pcocc"))
        .args(["image", "repo", "list"])
        .env("HOME", &home)
        .env("PCOCC_USER_CONF_DIR", &empty)
        .env("PCOCC_SYSTEM_CONF_DIR", &empty)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = home.join(".pcocc/images");
    assert!(
        stdout.contains(&format!("user    {}", repo.display())),
        "{stdout}"
    );
    for sub in ["data", "meta", ".tmp"] {
        assert!(repo.join(sub).is_dir(), "{sub} missing");
    }
    assert_eq!(
        std::fs::read_to_string(repo.join(".config")).unwrap(),
        "version: 2\n"
    );
}
