//! The `n4` binary as a service: every flag from an `N4_*` variable, the `--exec` hook after
//! WIN, shell completions and the man page, and the systemd units in `contrib/` naming only
//! variables `n4` reads. On loopback.

mod util;

use std::process::Command;
use std::time::Duration;

use util::{client, server, Proc, N4};

const T: Duration = Duration::from_secs(20);

#[test]
fn every_flag_can_come_from_the_environment() {
    let (_srv, port) = server(&[]);
    let mut a = client("a", port, 27300, &["--json"]);
    // The second client is configured by environment variables alone, as a unit file would.
    let mut cmd = Command::new(N4);
    cmd.env("N4_CLIENT", "true")
        .env("N4_HOST", "127.0.0.1")
        .env("N4_PORT", port.to_string())
        .env("N4_START", "27400")
        .env("N4_JSON", "true")
        .env("N4_TIMEOUT", "15");
    let mut b = Proc::spawn_command("b", cmd);
    for p in [&mut a, &mut b] {
        let line = p.wait_stdout(T);
        assert_eq!(p.wait_exit(T).code(), Some(0), "{}:\n{}", p.name, p.log());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v["local_port"].as_u64().is_some(), "{line}");
    }
    assert!(b.log().contains("Source port: 27400-"), "{}", b.log());
}

#[test]
fn help_names_the_environment_variable_of_every_flag() {
    let out = Command::new(N4).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--host",
        "--port",
        "--ident",
        "--key-file",
        "--wg",
        "--wg-peer",
        "--exec",
        "--timeout",
        "--listen",
        "--wait-timeout",
        "--forward",
        "--keepalive",
    ] {
        let line = help
            .lines()
            .find(|l| l.contains(&format!("{flag} ")) || l.trim_end().ends_with(flag))
            .unwrap_or_else(|| panic!("{flag} not in --help"));
        assert!(line.contains("[env: N4_"), "{flag}: {line}");
    }
}

#[test]
fn exec_runs_after_win_with_the_result_on_stdin_and_in_the_environment() {
    let dir = std::env::temp_dir().join(format!("n4-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json_file, env_file) = (dir.join("hook.json"), dir.join("hook.env"));
    let hook = format!(
        "cat > {}; echo \"$N4_LOCAL_PORT $N4_PEER_IP $N4_PEER_PORT $N4_ROUND\" > {}",
        json_file.display(),
        env_file.display()
    );
    let (_srv, port) = server(&[]);
    let mut a = client("a", port, 27500, &["--json", "--exec", &hook]);
    let mut b = client("b", port, 27600, &[]);
    let line = a.wait_stdout(T);
    assert_eq!(a.wait_exit(T).code(), Some(0), "{}", a.log());
    assert_eq!(b.wait_exit(T).code(), Some(0), "{}", b.log());
    let end = std::time::Instant::now() + T;
    while !env_file.exists() || std::fs::read_to_string(&env_file).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < end,
            "the hook did not run: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let result: serde_json::Value = serde_json::from_str(&line).unwrap();
    let hooked: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    assert_eq!(hooked, result, "the hook read the result JSON");
    let peer: std::net::SocketAddr = result["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        std::fs::read_to_string(env_file).unwrap().trim(),
        format!("{} {} {} 1", result["local_port"], peer.ip(), peer.port())
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn completions_and_the_man_page_come_from_the_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(N4)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("key-file") && text.contains("wg-peer"),
            "{shell}: {text}"
        );
    }
    let out = Command::new(N4).arg("man").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.contains(".TH n4 1") && man.contains("key\\-file"),
        "{man}"
    );
    let out = Command::new(N4)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn contrib_units_name_only_variables_n4_reads() {
    let help = String::from_utf8_lossy(&Command::new(N4).arg("--help").output().unwrap().stdout)
        .to_string();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for var in text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("N4_") && w.len() > 3)
        {
            seen += 1;
            // N4_KEY holds the key itself (read by n4, not a flag).
            assert!(
                var == "N4_KEY" || help.contains(&format!("[env: {var}=")),
                "{}: {var} is no n4 variable",
                path.display()
            );
        }
    }
    assert!(seen >= 10, "the units name the variables they set");
}
