//! The configuration's tests: defaults, every problem at once, the printed configuration
//! reading back, the shipped `config.toml` and the configuration reference's table; then the checks of
//! `validate.rs`, through whole files.

use super::read::{key_path, Segment};
use super::*;

fn problems(text: &str) -> Vec<String> {
    Config::from_toml_str(text).unwrap_err().0
}

#[test]
fn empty_file_gives_documented_defaults() {
    let config = Config::from_toml_str("").unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        config.server.admin_listen,
        "127.0.0.1:9090".parse().unwrap()
    );
    assert_eq!(config.server.max_body_bytes, 1 << 20);
    assert_eq!(config.server.request_head_timeout, Duration::from_secs(10));
    assert_eq!(config.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(config.server.body_timeout, Duration::from_secs(10));
    assert_eq!(config.server.max_connections, 10_000);
    assert_eq!(
        config.upstream.base_url.as_str(),
        "https://api.weixin.qq.com"
    );
    assert_eq!(config.code_cache.ttl, Duration::from_secs(300));
    assert_eq!(config.quota.window, Duration::from_secs(60));
    assert_eq!(
        config.quota.default.burst,
        config.quota.default.per_window / 10
    );
    assert_eq!(config.retry.max_hold, Duration::from_secs(65));
    let mut problems = Vec::new();
    assert_eq!(RawConfig::default().validate(&mut problems), Some(config));
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
        colour = "blue"
        [server]
        listen = "not an address"
        max_body_bytes = -1
        lisen = "typo"
        [upstream]
        base_url = "ftp://example"
        timeout_ms = "slow"
        [quota]
        per_window = 10
        burst = 20
        [quota.apis."/nope"]
        per_window = 1
        [retry]
        max_hold_ms = 10
    "#;
    let errors = problems(text);
    let all = errors.join("\n");
    for needle in [
        "colour: unknown key",
        "server.listen",
        "server.max_body_bytes: -1 is out of range (1..=1073741824)",
        "server.lisen: unknown key",
        "upstream.base_url: must be an http:// or https:// URL",
        "upstream.timeout_ms: expected an integer, found string",
        "quota.burst: 20 is larger than per_window (10)",
        "quota.apis.\"/nope\": not an API wxgate limits",
        "retry.max_hold_ms: 10 is shorter than quota.window_secs (60 s)",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(errors.len(), 9, "{all}");
    assert_eq!(problems(text), errors, "the same order every time");
}

#[test]
fn printed_configuration_reads_back_equal() {
    let text = r#"
        [server]
        listen = "127.0.0.1:18080"
        admin_listen = "[::1]:19090"
        allow = ["10.0.0.0/8", "::1"]
        max_body_bytes = 4096
        shutdown_grace_ms = 1500
        [upstream]
        base_url = "http://wechat.internal:8081/wx/"
        connect_timeout_ms = 300
        timeout_ms = 4000
        pool_max_idle = 0
        [code_cache]
        ttl_secs = 30
        max_entries = 99
        [quota]
        window_secs = 2
        per_window = 1000
        max_wait_ms = 0
        [quota.apis."/cgi-bin/token"]
        per_window = 20
        [quota.apis."/sns/jscode2session"]
        burst = 3
        [quota.appids.wx00000000000000a1]
        per_window = 7
        burst = 7
        [retry]
        busy_attempts = 0
    "#;
    let checked = CheckedConfig::from_toml_str(text).unwrap();
    let printed = checked.to_toml();
    // Defaults that depend on other keys are printed as chosen.
    for line in [
        "burst = 100\n",
        "max_hold_ms = 7000\n",
        "[quota.apis.\"/cgi-bin/token\"]\nper_window = 20\nburst = 2\n",
        "[quota.apis.\"/sns/jscode2session\"]\nper_window = 1000\nburst = 3\n",
        "allow = [\"10.0.0.0/8\", \"::1\"]\n",
    ] {
        assert!(printed.contains(line), "{line:?} missing from\n{printed}");
    }
    let again = CheckedConfig::from_toml_str(&printed).unwrap();
    assert_eq!(again.config, checked.config, "{printed}");
    assert_eq!(again.to_toml(), printed);
    let defaults = CheckedConfig::from_toml_str("").unwrap();
    assert_eq!(
        Config::from_toml_str(&defaults.to_toml()).unwrap(),
        Config::default()
    );
}

#[test]
fn printed_configuration_masks_the_password() {
    let text = "[upstream]\nbase_url = \"https://user:hunter2@wechat.internal/\"\n";
    let checked = CheckedConfig::from_toml_str(text).unwrap();
    let shown = checked.to_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("base_url = \"https://user:***@wechat.internal/\""),
        "{shown}"
    );
    let debug = format!("{checked:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    // The printed text is a valid configuration too (with the masked password).
    let again = Config::from_toml_str(&shown).unwrap();
    assert_eq!(again.quota, checked.config.quota);
    assert_eq!(
        again.upstream.base_url.as_str(),
        "https://user:***@wechat.internal"
    );
}

fn leaf_paths(value: &toml::Value, prefix: &[Segment], out: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let mut path = prefix.to_vec();
                path.push(Segment::Key(key.clone()));
                leaf_paths(value, &path, out);
            }
        }
        _ => out.push(key_path(prefix)),
    }
}

/// Every key the defaults print, by key path.
fn default_keys() -> Vec<String> {
    let printed = CheckedConfig::from_toml_str("").unwrap().to_toml();
    let mut keys = Vec::new();
    leaf_paths(
        &toml::Value::Table(printed.parse().unwrap()),
        &[],
        &mut keys,
    );
    assert!(keys.iter().any(|key| key == "quota.burst"), "{keys:?}");
    keys
}

#[test]
fn the_shipped_config_toml_holds_every_key_at_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let shipped = Config::load(Path::new(path)).unwrap_or_else(|errors| panic!("{errors}"));
    let defaults = Config::default();
    assert_eq!(shipped.server, defaults.server);
    assert_eq!(shipped.upstream, defaults.upstream);
    assert_eq!(shipped.code_cache, defaults.code_cache);
    assert_eq!(shipped.quota, defaults.quota);
    assert_eq!(shipped.retry, defaults.retry);
    assert_eq!(shipped.token_cache, defaults.token_cache);
    assert_eq!(shipped, defaults);

    let text = std::fs::read_to_string(path).unwrap();
    let mut written = Vec::new();
    leaf_paths(
        &toml::Value::Table(text.parse().unwrap()),
        &[],
        &mut written,
    );
    for key in default_keys() {
        assert!(written.contains(&key), "config.toml does not set {key}");
    }
}

#[test]
fn the_configuration_reference_documents_every_key() {
    let reference = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ));
    for key in default_keys() {
        assert!(
            reference.contains(&format!("| `{key}` |")),
            "docs/configuration.md's key table has no row for `{key}`"
        );
    }
}

/// Every key of `[cluster]`, each form's included, by key path.
fn cluster_keys() -> Vec<String> {
    let raw = super::RawConfig {
        cluster: Some(super::RawCluster {
            sentinels: vec!["h:1".into()],
            sentinel_master: Some("m".into()),
            cluster_nodes: vec!["h:1".into()],
            ca_file: Some("ca.pem".into()),
            secret_file: Some("secret".into()),
            redis_url: super::read::Secret::new("redis://h"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let printed = toml::to_string(&raw).unwrap();
    let mut keys = Vec::new();
    leaf_paths(
        &toml::Value::Table(printed.parse().unwrap()),
        &[],
        &mut keys,
    );
    keys.retain(|key| key.starts_with("cluster."));
    assert_eq!(keys.len(), 10, "{keys:?}");
    keys
}

#[test]
fn the_configuration_reference_documents_every_cluster_key() {
    let reference = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ));
    for key in cluster_keys() {
        assert!(
            reference.contains(&format!("| `{key}` |")),
            "docs/configuration.md's key table has no row for `{key}`"
        );
    }
}

#[test]
fn the_shipped_config_toml_mentions_every_cluster_key() {
    let shipped = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"));
    for key in cluster_keys() {
        let name = key.trim_start_matches("cluster.");
        assert!(
            shipped.contains(&format!("# {name} = ")),
            "config.toml's commented [cluster] has no {name}"
        );
    }
}

// The checks of `validate.rs`.
#[test]
fn dependent_checks_wait_for_valid_inputs() {
    // per_window out of range: no second message about its burst; an invalid window: no
    // message about retry.max_hold_ms, which derives from it.
    assert_eq!(
        problems("[quota]\nwindow_secs = 0\nper_window = 0\n"),
        [
            "quota.window_secs: 0 is out of range (1..=86400)",
            "quota.per_window: 0 is out of range (1..=100000000)",
        ]
    );
    assert_eq!(
        problems("[server]\nlisten = \"127.0.0.1:7\"\nadmin_listen = \"127.0.0.1:7\"\n"),
        ["server.admin_listen: must differ from server.listen (127.0.0.1:7): metrics never share the proxy port"]
    );
    assert_eq!(
        problems("[quota.appids.\"wx 1\"]\nburst = 1\n[quota.appids.wx1]\nburst = 9000\n"),
        [
            "quota.appids.\"wx 1\": not a plausible appid",
            "quota.appids.wx1.burst: 9000 is larger than per_window (5000): a burst cannot exceed the quota",
        ]
    );
}

#[test]
fn an_unusable_ca_file_is_named_by_its_key_never_by_its_path_or_contents() {
    let missing = problems("[upstream]\nca_file = \"/nonexistent/hunter2-a.pem\"\n");
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].starts_with("upstream.ca_file: cannot be read ("),
        "{missing:?}"
    );
    let path = std::env::temp_dir().join(format!("wxgate-validate-{}.pem", std::process::id()));
    std::fs::write(&path, "hunter2-b: not a certificate\n").unwrap();
    let text = format!("[upstream]\nca_file = {:?}\n", path.display().to_string());
    let no_certificate = problems(&text);
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        no_certificate,
        ["upstream.ca_file: holds no PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----)"]
    );
    assert!(!format!("{missing:?}{no_certificate:?}").contains("hunter2"));
}

#[test]
fn the_token_cache_stays_inside_wechats_overlap_and_excludes_plausible_appids() {
    assert_eq!(
        problems("[token_cache]\nrefresh_ahead_secs = 300\nexclude_appids = [\"wx1\", \"wx 2\"]\n"),
        [
            "token_cache.refresh_ahead_secs: 300 is out of range (1..=299)",
            "token_cache.exclude_appids[1]: not a plausible appid",
        ]
    );
    let config =
        Config::from_toml_str("[token_cache]\nenabled = false\nexclude_appids = [\"wx1\"]\n")
            .unwrap();
    assert!(!config.token_cache.enabled);
    assert!(config.token_cache.exclude_appids.contains("wx1"));
    assert_eq!(config.token_cache.refresh_ahead, Duration::from_secs(240));
}

#[test]
fn every_bad_allow_entry_is_named_by_its_index_and_never_quoted() {
    assert_eq!(
        problems("[server]\nallow = [\"10.0.0.0/8\", \"hunter2\", \"::1\", \"10.0.0.1/8\"]\n"),
        [
            "server.allow[1]: not an IP address or CIDR block (such as \"10.0.0.0/8\", \"127.0.0.1\" or \"::1\")",
            "server.allow[3]: has address bits set past its prefix length: write the block's first address (as in \"10.0.0.0/8\")",
        ]
    );
    assert_eq!(
        problems("[server]\nallow = []\n"),
        ["server.allow: an empty list would refuse every client: leave the key out to allow every address"]
    );
    // A value of the wrong type inside the list is named by its index too, and does not
    // shift the index of the entries after it.
    assert_eq!(
        problems("[server]\nallow = [7, \"hunter2\", \"::1\", true]\n"),
        [
            "server.allow[0]: expected a string, found integer",
            "server.allow[1]: not an IP address or CIDR block (such as \"10.0.0.0/8\", \"127.0.0.1\" or \"::1\")",
            "server.allow[3]: expected a string, found boolean",
        ]
    );
    assert_eq!(
        problems("[server]\nallow = \"10.0.0.0/8\"\n"),
        ["server.allow: expected an array, found string"]
    );
    let config =
        Config::from_toml_str("[server]\nallow = [\"127.0.0.1\", \"fd00::/8\"]\n").unwrap();
    assert!(config.server.allow.allows("fd00::9".parse().unwrap()));
    assert!(!config.server.allow.allows("127.0.0.2".parse().unwrap()));
    assert!(Config::default().server.allow.is_everyone());
}

#[test]
fn server_tls_problems_name_their_key_never_a_path_or_contents() {
    assert_eq!(
        problems("[server.tls]\n"),
        [
            "server.tls.cert_file: is required in [server.tls] (a PEM file)",
            "server.tls.key_file: is required in [server.tls] (a PEM file)",
        ]
    );
    let missing = problems(
        "[server.tls]\ncert_file = \"/nonexistent/hunter2-cert.pem\"\nkey_file = \"/nonexistent/hunter2-key.pem\"\n",
    );
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].starts_with("server.tls.cert_file: cannot be read ("),
        "{missing:?}"
    );
    let dir = std::env::temp_dir().join(format!("wxgate-validate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["wxgate.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_file = write("cert.pem", &certificate.pem());
    let other_key = write(
        "other-key.pem",
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let not_a_key = write("not-a-key.pem", "hunter2: no key here\n");
    let tls =
        |cert: &str, key: &str| format!("[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n");
    let mismatched = problems(&tls(&cert_file, &other_key));
    let no_key = problems(&tls(&cert_file, &not_a_key));
    let no_certificate = problems(&tls(&not_a_key, &not_a_key));
    let good = Config::from_toml_str(&tls(&cert_file, &write("key.pem", &key.serialize_pem())));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        mismatched,
        ["server.tls.key_file: is not the private key of the first certificate in server.tls.cert_file"]
    );
    assert_eq!(
        no_key,
        ["server.tls.key_file: holds no PEM private key (-----BEGIN PRIVATE KEY-----, or RSA / EC PRIVATE KEY)"]
    );
    assert_eq!(no_certificate.len(), 1, "{no_certificate:?}");
    assert!(no_certificate[0].starts_with("server.tls.cert_file: holds no PEM certificate"));
    let all = format!("{missing:?}{mismatched:?}{no_key:?}{no_certificate:?}");
    assert!(
        !all.contains("hunter2") && !all.contains("BEGIN CERTIFICATE-----\n"),
        "{all}"
    );
    assert!(good.unwrap().server.tls.is_some());
}

#[test]
fn appid_override_wins_over_api_override() {
    let text = r#"
        [quota]
        per_window = 100
        [quota.apis."/sns/jscode2session"]
        per_window = 50
        [quota.appids."wx00000000000000a1"]
        per_window = 20
        burst = 2
        [quota.appids."wx00000000000000c3"]
        burst = 7
    "#;
    let config = Config::from_toml_str(text).unwrap();
    let q = &config.quota;
    let limit = |appid: &str, api| q.limit_for(appid, api);
    assert_eq!(
        limit("wx00000000000000a1", Api::JsCode2Session).per_window,
        20
    );
    assert_eq!(
        limit("wx00000000000000b2", Api::JsCode2Session).per_window,
        50
    );
    assert_eq!(limit("wx00000000000000b2", Api::JsCode2Session).burst, 5);
    assert_eq!(limit("wx00000000000000b2", Api::Token).per_window, 100);
    assert_eq!(
        limit("wx00000000000000c3", Api::Token),
        QuotaLimit {
            per_window: 100,
            burst: 7
        }
    );
}

#[test]
fn files_larger_than_the_limit_are_refused_by_their_key_unread() {
    let dir = std::env::temp_dir().join(format!("wxgate-validate-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Sparse: 64 MiB of zeros that take no room on disk.
    let large = dir.join("large.pem");
    std::fs::File::create(&large)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["wxgate.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_file = dir.join("cert.pem");
    std::fs::write(&cert_file, certificate.pem()).unwrap();
    let cert_file = cert_file.display().to_string();
    for file in [large.display().to_string(), "/dev/zero".to_owned()] {
        let limit = "is larger than 4 MiB (the most wxgate reads of a file)";
        for (key, text) in [
            (
                "upstream.ca_file",
                format!("[upstream]\nca_file = {file:?}\n"),
            ),
            (
                "server.tls.cert_file",
                format!("[server.tls]\ncert_file = {file:?}\nkey_file = {cert_file:?}\n"),
            ),
            (
                "server.tls.key_file",
                format!("[server.tls]\ncert_file = {cert_file:?}\nkey_file = {file:?}\n"),
            ),
            (
                "cluster.secret_file",
                format!("[cluster]\nredis_url = \"redis://127.0.0.1:1\"\nsecret_file = {file:?}\n"),
            ),
        ] {
            assert_eq!(problems(&text), [format!("{key}: {limit}")], "{file}");
        }
        let errors = CheckedConfig::load(Path::new(&file)).unwrap_err().0;
        assert_eq!(errors, [format!("cannot read {file}: {limit}")]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// `[cluster]`'s Redis forms.
#[test]
fn a_cluster_section_names_one_redis_form_and_every_problem_with_its_key() {
    let secret = crate::config::test_files::TempFile::new("secret", &[b'k'; 32]);
    let with = |body: &str| {
        format!(
            "[cluster]\nsecret_file = \"{}\"\n{body}",
            secret.0.display()
        )
    };
    assert_eq!(
        problems(&with("")),
        ["cluster.redis_url: required when [cluster] is present (or cluster.sentinels, or cluster.cluster_nodes), such as \"redis://127.0.0.1:6379/0\""]
    );
    assert_eq!(
        problems(&with(
            "redis_url = \"redis://h\"\nsentinels = [\"h:1\"]\ncluster_nodes = [\"h:2\"]\n"
        )),
        [
            "cluster.sentinels: one Redis form at a time: cluster.redis_url, cluster.sentinels (with cluster.sentinel_master) or cluster.cluster_nodes",
            "cluster.cluster_nodes: one Redis form at a time: cluster.redis_url, cluster.sentinels (with cluster.sentinel_master) or cluster.cluster_nodes",
        ]
    );
    // Every problem at once: a bad entry, no master, a broken prefix, an unreadable CA.
    assert_eq!(
        problems(&with(
            "sentinels = [\"h:1\", \"hunter2\"]\nkey_prefix = \"wx{\"\nca_file = \"/nonexistent/ca.pem\"\n"
        )),
        [
            "cluster.sentinels[1]: must be a host and port such as \"10.0.0.5:6379\" (\"[::1]:6379\" for IPv6)",
            "cluster.sentinel_master: required with cluster.sentinels: the name the sentinels monitor the primary by (sentinel monitor NAME ...)",
            "cluster.ca_file: cannot be read (No such file or directory (os error 2))",
            "cluster.key_prefix: a '{' in it must be closed by a '}' in it, around at least one character (a Redis Cluster hash tag), or every key of a script would not share one slot",
        ]
    );
    assert_eq!(
        problems(&with("redis_url = \"redis://h\"\ntls = true\nsentinel_master = \"m\"\n")),
        [
            "cluster.sentinel_master: only with cluster.sentinels (the sentinels that know this primary)",
            "cluster.tls: cluster.redis_url says TLS with its scheme: write rediss:// (cluster.tls is for the sentinels and the cluster's nodes)",
        ]
    );
    // A prefix with a whole tag of its own is fine: every key then has that tag.
    assert!(
        Config::from_toml_str(&with("redis_url = \"redis://h\"\nkey_prefix = \"{wx}:\"\n")).is_ok()
    );
}

#[test]
fn check_config_says_which_redis_form_is_in_use_and_reads_back() {
    let secret = crate::config::test_files::TempFile::new("secret", &[b'k'; 32]);
    let forms = [
        ("redis_url = \"rediss://wxgate:hunter2@redis:6380/1\"\n", "standalone Redis at rediss://***:***@redis:6380/1"),
        (
            "sentinels = [\"10.0.0.1:26379\", \"[::1]:26379\", \"s:26379\"]\nsentinel_master = \"primary\"\ntls = true\n",
            "Redis Sentinel: the primary of \"primary\" as 3 sentinel(s) name it, TLS",
        ),
        ("cluster_nodes = [\"10.0.0.1:6379\", \"10.0.0.2:6379\"]\n", "Redis Cluster: 2 seed node(s)"),
    ];
    for (body, described) in forms {
        let text = format!(
            "[cluster]\nsecret_file = \"{}\"\n{body}",
            secret.0.display()
        );
        let checked = CheckedConfig::from_toml_str(&text).unwrap();
        let cluster = checked.config.cluster.as_ref().unwrap();
        assert_eq!(cluster.redis.describe(), described);
        let printed = checked.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        if !body.contains("hunter2") {
            let again = Config::from_toml_str(&printed).unwrap();
            assert_eq!(again.cluster, checked.config.cluster, "{printed}");
        }
    }
}
