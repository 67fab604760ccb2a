//! Repository configuration: pcocc's `repos.yaml`, loaded exactly as pcocc loads it.
//!
//! The user file (`$PCOCC_USER_CONF_DIR/repos.yaml`, default `~/.pcocc/repos.yaml`) comes
//! first, then the system file (`$PCOCC_SYSTEM_CONF_DIR/repos.yaml`, default
//! `/etc/pcocc/repos.yaml`); the first repository is the default one. An explicit file
//! (`pcocc --config FILE`) replaces both, and when no file exists at all the built-in
//! default is pcocc's stock one, a repository `user` at `%homedir/.pcocc/images`.
//! This module knows nothing of what a repository holds; YAML parsing sits behind one
//! small function ([`parse_yaml`]) so the YAML crate can be swapped in one line.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

/// The file name looked for in the user and system configuration directories.
const REPOS_FILE: &str = "repos.yaml";
/// pcocc's defaults when `PCOCC_USER_CONF_DIR` / `PCOCC_SYSTEM_CONF_DIR` are unset.
const DEFAULT_USER_CONF_SUBDIR: &str = ".pcocc";
const DEFAULT_SYSTEM_CONF_DIR: &str = "/etc/pcocc";
/// pcocc's stock repository, used when no configuration file exists at all.
const BUILTIN_REPO_NAME: &str = "user";
const BUILTIN_REPO_PATH: &str = "%homedir/.pcocc/images";

/// Where a repository's definition came from (pcocc's "tag").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The user's `repos.yaml`.
    User(PathBuf),
    /// The system `repos.yaml`.
    System(PathBuf),
    /// A file given with `--config`.
    Explicit(PathBuf),
    /// The built-in default (no file found).
    Default,
}

/// One configured repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoConfig {
    /// The name used in URIs (`NAME:image`).
    pub name: String,
    /// The repository directory, with `%{…}` and `~` expanded.
    pub path: PathBuf,
    /// Which file defined it.
    pub origin: Origin,
}

/// The repositories in priority order; the first is the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub repos: Vec<RepoConfig>,
}

/// A configuration that cannot be used. Messages follow pcocc's
/// `Unable to parse configuration file: …`, with the file name added.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not YAML, or not pcocc's schema; `reason` uses pcocc's (jsonschema's) wording.
    #[error("Unable to parse configuration file: {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// Two repositories with one name, in one file or across both.
    #[error("Unable to parse configuration file: Duplicate repository: {0}")]
    Duplicate(String),
    #[error("Unable to parse configuration file: {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A path names `%{env:VAR}` and VAR is unset.
    #[error(
        "Unable to parse configuration file: {path}: repository {repo}: environment variable {var} is not set"
    )]
    UnsetVariable {
        path: PathBuf,
        repo: String,
        var: String,
    },
}

/// What configuration loading reads from the process: kept in one value so tests can
/// give their own without touching the process environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// `$PCOCC_USER_CONF_DIR`, default `~/.pcocc`.
    pub user_conf_dir: PathBuf,
    /// `$PCOCC_SYSTEM_CONF_DIR`, default `/etc/pcocc`.
    pub system_conf_dir: PathBuf,
    /// `%{homedir}` and `~`.
    pub homedir: PathBuf,
    /// `%{user}`: the user name of the process's uid.
    pub user: String,
    /// Variables for `%{env:VAR}`.
    pub vars: HashMap<String, String>,
}

impl Env {
    /// The environment of this process.
    pub fn from_process() -> Env {
        let (pw_name, pw_dir) = current_passwd();
        Env::from_vars(std::env::vars().collect(), pw_name, pw_dir)
    }

    /// The environment given variables and the process user's passwd name and home:
    /// `$HOME` wins over the passwd home (as Python's `expanduser`), the passwd name
    /// over `$USER`.
    pub fn from_vars(
        vars: HashMap<String, String>,
        pw_name: Option<String>,
        pw_dir: Option<PathBuf>,
    ) -> Env {
        let homedir = vars
            .get("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or(pw_dir)
            .unwrap_or_else(|| PathBuf::from("/"));
        let user = pw_name
            .or_else(|| vars.get("USER").cloned())
            .unwrap_or_default();
        let user_conf_dir = vars
            .get("PCOCC_USER_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| homedir.join(DEFAULT_USER_CONF_SUBDIR));
        let system_conf_dir = vars
            .get("PCOCC_SYSTEM_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SYSTEM_CONF_DIR));
        Env {
            user_conf_dir,
            system_conf_dir,
            homedir,
            user,
            vars,
        }
    }
}

/// The passwd entry (name, home) of the process's real uid, when there is one.
fn current_passwd() -> (Option<String>, Option<PathBuf>) {
    match crate::sys::user_name_and_home(crate::sys::uid()) {
        Some((name, home)) => (Some(name), Some(home)),
        None => (None, None),
    }
}

impl Config {
    /// Loads the configuration the way `pcocc` does, from this process's environment:
    /// `explicit` (from `--config`) if given, else the user file then the system file,
    /// else the built-in default.
    pub fn load(explicit: Option<&Path>) -> Result<Config, Error> {
        Config::load_with(explicit, &Env::from_process())
    }

    /// [`Config::load`] with an explicit environment.
    pub fn load_with(explicit: Option<&Path>, env: &Env) -> Result<Config, Error> {
        let mut repos = Vec::new();
        if let Some(file) = explicit {
            // An explicit file must exist: a typo must not silently mean "defaults".
            let text = read_config(file).map_err(|source| Error::Read {
                path: file.to_path_buf(),
                source,
            })?;
            load_file(&text, Origin::Explicit(file.to_path_buf()), env, &mut repos)?;
            return Ok(Config { repos });
        }
        let user = env.user_conf_dir.join(REPOS_FILE);
        let system = env.system_conf_dir.join(REPOS_FILE);
        let mut found = false;
        for origin in [Origin::User(user), Origin::System(system)] {
            let path = origin_path(&origin);
            match read_config(path) {
                Ok(text) => {
                    found = true;
                    load_file(&text, origin.clone(), env, &mut repos)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Read {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        if !found {
            repos.push(RepoConfig {
                name: BUILTIN_REPO_NAME.to_string(),
                path: expand_path(BUILTIN_REPO_PATH, env, Path::new("(built-in)"), "user")?,
                origin: Origin::Default,
            });
        }
        Ok(Config { repos })
    }

    /// The repository named `name`.
    pub fn repo(&self, name: &str) -> Option<&RepoConfig> {
        self.repos.iter().find(|r| r.name == name)
    }
}

/// Largest repos.yaml read: a list of names and paths, far below this.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Reads a configuration file, refusing one too large to be a repository list before
/// allocating for it. (The store has its own bounded reader; config depends on nothing.)
fn read_config(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("more than {MAX_CONFIG_BYTES} bytes"),
        ));
    }
    Ok(text)
}

fn origin_path(origin: &Origin) -> &Path {
    match origin {
        Origin::User(p) | Origin::System(p) | Origin::Explicit(p) => p,
        Origin::Default => Path::new(""),
    }
}

/// Parses YAML text into a generic value: the one place that names the YAML crate.
pub fn parse_yaml(text: &str) -> Result<serde_yaml::Value, String> {
    serde_yaml::from_str(text).map_err(|e| e.to_string())
}

/// Checks one file against pcocc's schema (`{repos: [{name, path}], cache: {path}}`,
/// no other keys) and appends its repositories, rejecting duplicate names.
fn load_file(
    text: &str,
    origin: Origin,
    env: &Env,
    repos: &mut Vec<RepoConfig>,
) -> Result<(), Error> {
    use serde_yaml::Value;
    let path = origin_path(&origin).to_path_buf();
    let bad = |reason: String| Error::Parse {
        path: path.clone(),
        reason,
    };
    let doc = parse_yaml(text).map_err(&bad)?;
    let Value::Mapping(top) = &doc else {
        return Err(bad(not_of_type(&doc, "object")));
    };
    check_keys(top, &["repos", "cache"], &["repos"]).map_err(&bad)?;
    if let Some(cache) = top.get("cache") {
        // pcocc's container image cache: accepted and checked, unused by VM images.
        let Value::Mapping(c) = cache else {
            return Err(bad(not_of_type(cache, "object")));
        };
        check_keys(c, &["path"], &["path"]).map_err(&bad)?;
        expect_str(&c["path"]).map_err(&bad)?;
    }
    let list = &top["repos"];
    let Value::Sequence(items) = list else {
        return Err(bad(not_of_type(list, "array")));
    };
    for item in items {
        let Value::Mapping(m) = item else {
            return Err(bad(not_of_type(item, "object")));
        };
        check_keys(m, &["name", "path"], &["name", "path"]).map_err(&bad)?;
        let name = expect_str(&m["name"]).map_err(&bad)?;
        let raw_path = expect_str(&m["path"]).map_err(&bad)?;
        if repos.iter().any(|r| r.name == name) {
            return Err(Error::Duplicate(name.to_string()));
        }
        repos.push(RepoConfig {
            name: name.to_string(),
            path: expand_path(raw_path, env, &path, name)?,
            origin: origin.clone(),
        });
    }
    Ok(())
}

/// jsonschema's wording for required and unexpected keys, in its order: required first.
fn check_keys(m: &serde_yaml::Mapping, allowed: &[&str], required: &[&str]) -> Result<(), String> {
    for key in required {
        if !m.contains_key(*key) {
            return Err(format!("'{key}' is a required property"));
        }
    }
    let extra: Vec<String> = m
        .keys()
        .filter(|k| !k.as_str().is_some_and(|k| allowed.contains(&k)))
        .map(py_repr)
        .collect();
    match extra.len() {
        0 => Ok(()),
        1 => Err(format!(
            "Additional properties are not allowed ({} was unexpected)",
            extra[0]
        )),
        _ => Err(format!(
            "Additional properties are not allowed ({} were unexpected)",
            extra.join(", ")
        )),
    }
}

fn expect_str(v: &serde_yaml::Value) -> Result<&str, String> {
    v.as_str().ok_or_else(|| not_of_type(v, "string"))
}

fn not_of_type(v: &serde_yaml::Value, ty: &str) -> String {
    format!("{} is not of type '{ty}'", py_repr(v))
}

/// A YAML value written as Python's `repr` would write what PyYAML loads, so messages
/// read like pcocc's (`None is not of type 'object'`).
fn py_repr(v: &serde_yaml::Value) -> String {
    use serde_yaml::Value;
    match v {
        Value::Null => "None".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{s}'"),
        Value::Sequence(items) => {
            let parts: Vec<String> = items.iter().map(py_repr).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Mapping(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", py_repr(k), py_repr(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::Tagged(t) => py_repr(&t.value),
    }
}

/// Expands the `%` tags of a repository path as pcocc does, then a leading `~` (pcocc
/// applies `expanduser` after its own tags).
///
/// pcocc substitutes with Python's `string.Template` (delimiter `%`, leaving what it does
/// not know) and does so twice, so `%%user` is the user name and `%%%%` is one `%`:
///
/// * `%homedir` and `%user` (a whole identifier: `%users` is not `%user` + `s`), and the
///   braced `%{homedir}`, `%{user}` and `%{env:VAR}`;
/// * `%%` is one `%`;
/// * anything else (`%foo`, `%{foo}`, `%env:VAR`, a lone `%`) is left as written.
///
/// An unset variable is an error naming it (pcocc would leave the tag in place and fail
/// later on a directory that does not exist).
fn expand_path(raw: &str, env: &Env, file: &Path, repo: &str) -> Result<PathBuf, Error> {
    let once = substitute(raw, env, file, repo)?;
    let out = substitute(&once, env, file, repo)?;
    if out == "~" {
        return Ok(env.homedir.clone());
    }
    if let Some(tail) = out.strip_prefix("~/") {
        return Ok(env.homedir.join(tail));
    }
    Ok(PathBuf::from(out))
}

/// One pass of `string.Template.safe_substitute` with pcocc's tags (see [`expand_path`]).
fn substitute(raw: &str, env: &Env, file: &Path, repo: &str) -> Result<String, Error> {
    let value = |tag: &str| match tag {
        "homedir" => Some(env.homedir.to_string_lossy().into_owned()),
        "user" => Some(env.user.clone()),
        _ => None,
    };
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            out.push('%');
            rest = tail;
        } else if let Some(braced) = after.strip_prefix('{')
            && let Some(end) = braced.find('}')
        {
            let tag = &braced[..end];
            let whole = &rest[start..start + 1 + 1 + end + 1];
            let expanded = match tag.strip_prefix("env:") {
                Some(var) => match env.vars.get(var) {
                    Some(val) => Some(val.clone()),
                    None => {
                        return Err(Error::UnsetVariable {
                            path: file.to_path_buf(),
                            repo: repo.to_string(),
                            var: var.to_string(),
                        });
                    }
                },
                None => value(tag),
            };
            out.push_str(expanded.as_deref().unwrap_or(whole));
            rest = &braced[end + 1..];
        } else {
            // An identifier as Python's Template reads one: [_a-z][_a-z0-9]*, any case.
            let len = after
                .char_indices()
                .take_while(|&(i, c)| {
                    c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
                })
                .count();
            let ident = &after[..len];
            match value(ident) {
                Some(v) if len > 0 => out.push_str(&v),
                _ => out.push_str(&rest[start..start + 1 + len]),
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch environment: user and system configuration directories and a home,
    /// all under one temporary directory.
    struct Scratch {
        dir: tempfile::TempDir,
        env: Env,
    }

    fn scratch() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = Env {
            user_conf_dir: dir.path().join("user"),
            system_conf_dir: dir.path().join("etc"),
            homedir: dir.path().join("home"),
            user: "alice".to_string(),
            vars: HashMap::from([("SCRATCH".to_string(), "/scratch".to_string())]),
        };
        Scratch { dir, env }
    }

    impl Scratch {
        fn write_user(&self, text: &str) {
            std::fs::create_dir_all(&self.env.user_conf_dir).unwrap();
            std::fs::write(self.env.user_conf_dir.join(REPOS_FILE), text).unwrap();
        }
        fn write_system(&self, text: &str) {
            std::fs::create_dir_all(&self.env.system_conf_dir).unwrap();
            std::fs::write(self.env.system_conf_dir.join(REPOS_FILE), text).unwrap();
        }
        fn load(&self) -> Result<Config, Error> {
            Config::load_with(None, &self.env)
        }
    }

    fn names(c: &Config) -> Vec<&str> {
        c.repos.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn conf_dirs_come_from_pcocc_variables_with_pcocc_defaults() {
        let vars = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let e = Env::from_vars(
            vars(&[("HOME", "/home/a")]),
            Some("alice".into()),
            Some("/pw/alice".into()),
        );
        assert_eq!(e.user_conf_dir, Path::new("/home/a/.pcocc"));
        assert_eq!(e.system_conf_dir, Path::new("/etc/pcocc"));
        assert_eq!(
            (e.homedir.as_path(), e.user.as_str()),
            (Path::new("/home/a"), "alice")
        );
        let e = Env::from_vars(
            vars(&[
                ("PCOCC_USER_CONF_DIR", "/u"),
                ("PCOCC_SYSTEM_CONF_DIR", "/s"),
                ("USER", "bob"),
            ]),
            None,
            Some("/pw/bob".into()),
        );
        assert_eq!(e.user_conf_dir, Path::new("/u"));
        assert_eq!(e.system_conf_dir, Path::new("/s"));
        assert_eq!(
            (e.homedir.as_path(), e.user.as_str()),
            (Path::new("/pw/bob"), "bob")
        );
    }

    #[test]
    fn user_repositories_come_before_system_ones() {
        let s = scratch();
        s.write_system("repos:\n  - name: global\n    path: /g\n");
        s.write_user("repos:\n  - name: mine\n    path: /m\n  - name: other\n    path: /o\n");
        let c = s.load().unwrap();
        assert_eq!(names(&c), ["mine", "other", "global"]);
        assert_eq!(c.repos[2].path, Path::new("/g"));
        assert!(matches!(c.repos[0].origin, Origin::User(_)));
        assert!(matches!(c.repos[2].origin, Origin::System(_)));
    }

    #[test]
    fn system_file_alone_is_enough() {
        let s = scratch();
        s.write_system("repos:\n  - name: global\n    path: /g\n");
        assert_eq!(names(&s.load().unwrap()), ["global"]);
    }

    #[test]
    fn no_file_at_all_gives_the_builtin_user_repository_in_the_home() {
        let s = scratch();
        let c = s.load().unwrap();
        assert_eq!(names(&c), ["user"]);
        assert_eq!(c.repos[0].path, s.env.homedir.join(".pcocc/images"));
        assert_eq!(c.repos[0].origin, Origin::Default);
    }

    #[test]
    fn an_empty_repository_list_is_a_valid_configuration_with_no_repository() {
        let s = scratch();
        s.write_system("repos: []\n");
        assert!(s.load().unwrap().repos.is_empty());
    }

    #[test]
    fn explicit_file_replaces_both_files() {
        let s = scratch();
        s.write_system("repos:\n  - name: global\n    path: /g\n");
        s.write_user("repos:\n  - name: mine\n    path: /m\n");
        let file = s.dir.path().join("other.yaml");
        std::fs::write(&file, "repos:\n  - name: only\n    path: /x\n").unwrap();
        let c = Config::load_with(Some(&file), &s.env).unwrap();
        assert_eq!(names(&c), ["only"]);
        assert_eq!(c.repos[0].origin, Origin::Explicit(file));
    }

    #[test]
    fn missing_explicit_file_is_an_error_naming_it() {
        let s = scratch();
        let file = s.dir.path().join("nope.yaml");
        let err = Config::load_with(Some(&file), &s.env).unwrap_err();
        assert!(matches!(err, Error::Read { .. }));
        assert!(err.to_string().contains("nope.yaml"), "{err}");
    }

    #[test]
    fn homedir_user_and_env_tags_expand_in_paths() {
        let s = scratch();
        s.write_user(concat!(
            "repos:\n",
            "  - name: a\n    path: \"%{homedir}/imgs\"\n",
            "  - name: b\n    path: \"/srv/%{user}/imgs\"\n",
            "  - name: c\n    path: \"%{env:SCRATCH}/%{user}\"\n",
            "  - name: d\n    path: \"~/x\"\n",
            "  - name: e\n    path: \"/keep/%{unknown}/$HOME\"\n",
        ));
        let c = s.load().unwrap();
        let paths: Vec<PathBuf> = c.repos.iter().map(|r| r.path.clone()).collect();
        assert_eq!(
            paths,
            [
                s.env.homedir.join("imgs"),
                PathBuf::from("/srv/alice/imgs"),
                PathBuf::from("/scratch/alice"),
                s.env.homedir.join("x"),
                PathBuf::from("/keep/%{unknown}/$HOME"),
            ]
        );
    }

    #[test]
    fn tags_expand_as_pcoccs_two_template_passes() {
        // Each case as pcocc 0.7.5 lists the repository's path (user `alice`).
        let s = scratch();
        let home = s.env.homedir.to_string_lossy().into_owned();
        let cases = [
            ("/t/%homedir/x", format!("/t/{home}/x")),
            ("/t/%user-y/%%z", "/t/alice-y/%z".to_string()),
            ("/t/%{user}w%{homedir}", format!("/t/alicew{home}")),
            (
                "/t/%{env:SCRATCH}/%env:SCRATCH/%foo/%{foo}/a%b/%",
                "/t//scratch/%env:SCRATCH/%foo/%{foo}/a%b/%".to_string(),
            ),
            (
                "/t/%users/%homedirx/%user_x/%9/%-/%USER",
                "/t/%users/%homedirx/%user_x/%9/%-/%USER".to_string(),
            ),
            ("~/ff/%%{user}", format!("{home}/ff/alice")),
            ("/t/q%%%%q/%%user", "/t/q%q/alice".to_string()),
            ("/t/q%%%%%%%%q", "/t/q%%q".to_string()),
            ("%homedir/.pcocc/images", format!("{home}/.pcocc/images")),
        ];
        let mut yaml = String::from("repos:\n");
        for (i, (raw, _)) in cases.iter().enumerate() {
            yaml += &format!("  - name: r{i}\n    path: \"{raw}\"\n");
        }
        s.write_user(&yaml);
        let c = s.load().unwrap();
        for ((raw, want), repo) in cases.iter().zip(&c.repos) {
            assert_eq!(repo.path, PathBuf::from(want), "{raw}");
        }
    }

    #[test]
    fn unset_environment_variable_is_an_error_naming_it() {
        let s = scratch();
        s.write_user("repos:\n  - name: a\n    path: \"%{env:NOPE}/x\"\n");
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("NOPE") && err.contains("repos.yaml"), "{err}");
    }

    #[test]
    fn duplicate_names_in_one_file_are_rejected() {
        let s = scratch();
        s.write_system("repos:\n  - name: r\n    path: /a\n  - name: r\n    path: /b\n");
        assert_eq!(
            s.load().unwrap_err().to_string(),
            "Unable to parse configuration file: Duplicate repository: r"
        );
    }

    #[test]
    fn duplicate_names_across_user_and_system_files_are_rejected() {
        let s = scratch();
        s.write_system("repos:\n  - name: r\n    path: /a\n");
        s.write_user("repos:\n  - name: r\n    path: /b\n");
        assert!(matches!(s.load().unwrap_err(), Error::Duplicate(n) if n == "r"));
    }

    /// Loads `text` as the system file and returns the error message with the file name
    /// replaced by `FILE`.
    fn schema_error(text: &str) -> String {
        let s = scratch();
        s.write_system(text);
        let file = s.env.system_conf_dir.join(REPOS_FILE);
        let msg = s.load().unwrap_err().to_string();
        msg.replace(&file.display().to_string(), "FILE")
    }

    #[test]
    fn schema_errors_name_the_file_and_use_pcocc_wording() {
        let p = "Unable to parse configuration file: FILE: ";
        let cases = [
            ("repos:\n  - name: r\n", "'path' is a required property"),
            ("repos:\n  - path: /x\n", "'name' is a required property"),
            (
                "repos:\n  - name: r\n    path: /x\n    extra: 1\n",
                "Additional properties are not allowed ('extra' was unexpected)",
            ),
            (
                "repos: []\nfoo: 1\n",
                "Additional properties are not allowed ('foo' was unexpected)",
            ),
            ("foo: 1\n", "'repos' is a required property"),
            ("repos: 5\n", "5 is not of type 'array'"),
            ("repos:\n", "None is not of type 'array'"),
            ("repos:\n  - 5\n", "5 is not of type 'object'"),
            (
                "repos:\n  - name: 3\n    path: /x\n",
                "3 is not of type 'string'",
            ),
            (
                "repos:\n  - name: r\n    path: 5\n",
                "5 is not of type 'string'",
            ),
            ("", "None is not of type 'object'"),
            ("- 1\n", "[1] is not of type 'object'"),
            ("repos: []\ncache: 5\n", "5 is not of type 'object'"),
            (
                "repos: []\ncache:\n  foo: 1\n",
                "'path' is a required property",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(schema_error(text), format!("{p}{want}"), "for {text:?}");
        }
    }

    #[test]
    fn a_cache_section_is_accepted() {
        let s = scratch();
        s.write_system("repos:\n  - name: r\n    path: /a\ncache:\n  path: /c\n");
        assert_eq!(names(&s.load().unwrap()), ["r"]);
    }

    #[test]
    fn yaml_syntax_errors_name_the_file() {
        let msg = schema_error("{{{");
        assert!(
            msg.starts_with("Unable to parse configuration file: FILE: "),
            "{msg}"
        );
    }

    #[test]
    fn any_string_is_a_repository_name_as_in_pcocc() {
        let s = scratch();
        s.write_system("repos:\n  - name: \"a b\"\n    path: rel/dir\n");
        let c = s.load().unwrap();
        assert_eq!(c.repos[0].name, "a b");
        assert_eq!(c.repos[0].path, Path::new("rel/dir"));
    }
}
