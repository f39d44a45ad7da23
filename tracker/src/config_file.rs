//! Layered configuration for both binaries: flags, over environment variables, over a TOML file (`--config`),
//! over the built-in defaults.
//!
//! Every flag of every subcommand gets an environment variable (`ANOMOS_` and the flag's long name in upper case
//! with `_` for `-`: `--tracker-fp` is `ANOMOS_TRACKER_FP`; the tracker's flags use `ANOMOS_TRACKER_`) and a
//! config-file key (the long name, `-` or `_`). A file looks like this:
//!
//! ```toml
//! # Top level: applies to every command that has the flag.
//! tracker = "203.0.113.7:7700"
//! tracker-fp = "ae71…"
//! log-level = "info"
//!
//! [peer]            # only `anomos peer`
//! listen = "0.0.0.0:8633"
//! serve = ["regtest"]
//!
//! [anomos-tracker]  # the tracker, `anomos-tracker` or `anomos tracker` (`tracker` is the peer's flag)
//! listen = "0.0.0.0:7700"
//! ```
//!
//! Sections are named after subcommands (`[peer]`, `[fetch]`, `[chain.import]`), except the tracker's.
//!
//! How: the command line is parsed once leniently to find `--config` and the subcommand; every file setting whose
//! flag was given neither on the command line nor in the environment is then appended as `--flag=value`, and the
//! result is parsed for real, so clap checks file values exactly as it checks flags. Typos are errors: a key that
//! no flag has, a section that is not a subcommand, a value of the wrong shape.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// Largest config file read (it holds a few dozen settings).
pub const MAX_FILE_LEN: u64 = 1024 * 1024;

/// What is wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Larger than [`MAX_FILE_LEN`].
    #[error("config file {0}: larger than {MAX_FILE_LEN} bytes")]
    TooLarge(PathBuf),
    /// Not TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (with line and column).
        message: String,
    },
    /// A key that no flag of that section's command has, or a section that is no subcommand.
    #[error("config file {path}: {message}")]
    Unknown {
        /// The file.
        path: PathBuf,
        /// Which key or section, and where.
        message: String,
    },
    /// A value that cannot be a flag's value (a table where a string belongs, a list for a single value, …).
    #[error("config file {path}: `{key}`: {message}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// How one binary names its environment variables and sections.
#[derive(Debug, Clone, Copy)]
pub struct Layering {
    /// Environment variable prefix of the root command's flags (`ANOMOS_`).
    pub env_prefix: &'static str,
    /// Subcommands whose flags use another prefix (`("tracker", "ANOMOS_TRACKER_")`).
    pub sub_prefixes: &'static [(&'static str, &'static str)],
    /// The section the root command's own flags are read from besides the top level (the tracker binary reads
    /// `[anomos-tracker]`, like `anomos tracker` does); `None` for a binary with subcommands.
    pub root_section: Option<&'static str>,
    /// Subcommands whose section has another name (`("tracker", "anomos-tracker")`: the top-level key
    /// `tracker` is the peers' `--tracker` flag).
    pub section_names: &'static [(&'static str, &'static str)],
    /// The id of the `--config` argument on the root command.
    pub config_arg: &'static str,
}

/// The layering of the `anomos` binary.
pub const ANOMOS: Layering = Layering {
    env_prefix: "ANOMOS_",
    sub_prefixes: &[("tracker", "ANOMOS_TRACKER_")],
    root_section: None,
    section_names: &[("tracker", "anomos-tracker")],
    config_arg: "config",
};

/// The layering of the `anomos-tracker` binary (same variables and section as `anomos tracker`).
pub const TRACKER: Layering = Layering {
    env_prefix: "ANOMOS_TRACKER_",
    sub_prefixes: &[],
    root_section: Some("anomos-tracker"),
    section_names: &[],
    config_arg: "config",
};

impl Layering {
    /// The section of top-level subcommand `name`.
    fn section_of<'a>(&self, name: &'a str) -> &'a str {
        self.section_names.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).unwrap_or(name)
    }
}

/// The environment variable of a flag.
pub fn env_name(prefix: &str, long: &str) -> String {
    format!("{prefix}{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// Gives every named, visible flag of `cmd` and its subcommands an environment variable (flags that already have
/// one keep it).
pub fn with_env(cmd: Command, layering: &Layering) -> Command {
    fn walk(cmd: Command, prefix: &str, layering: &Layering) -> Command {
        let config_arg = layering.config_arg;
        let cmd = cmd.mut_args(|a| {
            let wants_env = a.get_env().is_none()
                && !a.is_hide_set()
                && a.get_id() != config_arg
                && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version | ArgAction::HelpShort);
            match (wants_env, a.get_long()) {
                (true, Some(long)) => {
                    let name = env_name(prefix, long);
                    a.env(name)
                }
                _ => a,
            }
        });
        let subs: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
        subs.into_iter().fold(cmd, |cmd, name| {
            let sub_prefix = layering
                .sub_prefixes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| p.to_string())
                .unwrap_or_else(|| prefix.to_string());
            cmd.mut_subcommand(&name, |s| walk(s, &sub_prefix, layering))
        })
    }
    walk(cmd, layering.env_prefix, layering)
}

/// The arguments to parse: `argv` plus every setting of the config file (if `--config` or its environment
/// variable names one) that neither a flag nor an environment variable already gives. `cmd` must come from
/// [`with_env`].
pub fn layered_args(cmd: &Command, argv: Vec<OsString>, layering: &Layering) -> Result<Vec<OsString>, ConfigFileError> {
    layered(cmd, argv, layering).map(|l| l.args)
}

/// What [`layered`] made of the command line.
#[derive(Debug, Clone, Default)]
pub struct Layered {
    /// The arguments to parse.
    pub args: Vec<OsString>,
    /// The config file, if one was read.
    pub file: Option<PathBuf>,
    /// The flags (long names) whose values came from the file.
    pub from_file: Vec<String>,
}

/// [`layered_args`], also telling which flags came from which file (for error messages).
pub fn layered(cmd: &Command, argv: Vec<OsString>, layering: &Layering) -> Result<Layered, ConfigFileError> {
    let mut from_file = Vec::new();
    let Ok(lenient) = cmd.clone().ignore_errors(true).try_get_matches_from(argv.iter()) else {
        // Help, version or an error: the real parse reports it.
        return Ok(Layered { args: argv, ..Default::default() });
    };
    let Some(path) = lenient.get_one::<PathBuf>(layering.config_arg).cloned() else {
        return Ok(Layered { args: argv, ..Default::default() });
    };
    let table = read_table(&path)?;

    // The subcommand path and the matches of the command that runs.
    let mut names: Vec<String> = Vec::new();
    let mut matches: &ArgMatches = &lenient;
    let mut active: &Command = cmd;
    // The commands above the active one, with their matches: their global flags apply too.
    let mut above: Vec<(&Command, &ArgMatches)> = Vec::new();
    while let Some((name, sub)) = matches.subcommand() {
        let Some(next) = active.find_subcommand(name) else { break };
        names.push(name.to_string());
        above.push((active, matches));
        matches = sub;
        active = next;
    }

    let mut extra: Vec<OsString> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // The most specific section first: it wins over the top level for the same key.
    let mut section_path: Vec<String> = layering.root_section.map(|s| vec![s.to_string()]).unwrap_or_default();
    for (i, n) in names.iter().enumerate() {
        section_path.push(if i == 0 { layering.section_of(n).to_string() } else { n.clone() });
    }
    let mut scopes: Vec<(String, &toml::Table)> = Vec::new();
    if let Some(t) = section(&table, &section_path, &path)? {
        scopes.push((section_path.join("."), t));
    }
    scopes.push((String::new(), &table));
    check_sections(&table, cmd, layering, &path)?;

    for (scope, t) in scopes {
        for (key, value) in t {
            if value.is_table() {
                continue; // a section, checked by check_sections
            }
            let long = key.replace('_', "-");
            let named = |a: &&clap::Arg| a.get_long() == Some(long.as_str()) && !a.is_hide_set();
            let found = active.get_arguments().find(named).map(|a| (a, matches)).or_else(|| {
                above
                    .iter()
                    .rev()
                    .find_map(|(c, m)| c.get_arguments().filter(|a| a.is_global_set()).find(named).map(|a| (a, *m)))
            });
            let Some((arg, defined_at)) = found else {
                if scope.is_empty() && flag_anywhere(cmd, &long) {
                    continue; // a top-level key for another command
                }
                let place = if scope.is_empty() { "top level".to_string() } else { format!("[{scope}]") };
                let who = std::iter::once(cmd.get_name().to_string()).chain(names.iter().cloned()).collect::<Vec<_>>();
                return Err(ConfigFileError::Unknown {
                    path,
                    message: format!("{place}: no setting `{key}` (see `{} --help`)", who.join(" ")),
                });
            };
            let id = arg.get_id().as_str().to_string();
            if !seen.insert(id.clone()) {
                continue;
            }
            let given = |m: &ArgMatches| {
                matches!(m.value_source(&id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
            };
            if given(matches) || given(defined_at) {
                continue;
            }
            extra.extend(tokens(&long, arg.get_action(), value).map_err(|message| ConfigFileError::Value {
                path: path.clone(),
                key: key.clone(),
                message,
            })?);
            from_file.push(long);
        }
    }

    let mut out = argv;
    let at = out.iter().position(|a| a == "--").unwrap_or(out.len());
    out.splice(at..at, extra);
    Ok(Layered { args: out, file: Some(path), from_file })
}

/// Parses the process's command line for `P` with the config file and environment layered under it (see the
/// module documentation). Exits like clap does on a usage error (status 2), and on a bad config file.
pub fn parse<P: clap::Parser>(layering: &Layering) -> P {
    let cmd = with_env(P::command(), layering);
    let layered = match layered(&cmd, std::env::args_os().collect(), layering) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e}", cmd.get_name());
            std::process::exit(2);
        }
    };
    let matches = cmd.try_get_matches_from(&layered.args).unwrap_or_else(|e| {
        // A bad value from the file: say where it came from (clap only knows it as a flag).
        let text = e.render().to_string();
        let culprits: Vec<&String> = layered.from_file.iter().filter(|l| text.contains(&format!("--{l}"))).collect();
        match &layered.file {
            Some(file) if e.use_stderr() && !culprits.is_empty() => {
                eprint!("{text}");
                for long in culprits {
                    eprintln!("note: `{long}` is set in the config file {}", file.display());
                }
                std::process::exit(2)
            }
            _ => e.exit(),
        }
    });
    P::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigFileError> {
    use std::io::Read;
    let read_err = |source| ConfigFileError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    file.take(MAX_FILE_LEN + 1).read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > MAX_FILE_LEN {
        return Err(ConfigFileError::TooLarge(path.to_path_buf()));
    }
    text.parse::<toml::Table>()
        .map_err(|e| ConfigFileError::Syntax { path: path.to_path_buf(), message: e.to_string().trim().to_string() })
}

/// The table at `names` (`[chain.import]` is `["chain", "import"]`), if the file has one.
fn section<'t>(
    table: &'t toml::Table,
    names: &[String],
    path: &Path,
) -> Result<Option<&'t toml::Table>, ConfigFileError> {
    let mut t = table;
    for n in names {
        match t.get(n) {
            None => return Ok(None),
            Some(toml::Value::Table(next)) => t = next,
            Some(_) => {
                return Err(ConfigFileError::Value {
                    path: path.to_path_buf(),
                    key: n.clone(),
                    message: "is the name of a subcommand: a section `[…]`, not a value".into(),
                })
            }
        }
    }
    Ok(Some(t))
}

/// Every table of the file must name a subcommand and every key a flag of its section's command (or a global
/// flag), whichever subcommand runs now: a typo anywhere in the file is reported at once.
fn check_sections(table: &toml::Table, cmd: &Command, layering: &Layering, path: &Path) -> Result<(), ConfigFileError> {
    let globals: Vec<String> =
        cmd.get_arguments().filter(|a| a.is_global_set()).filter_map(|a| a.get_long()).map(str::to_string).collect();
    let walk = |t: &toml::Table, cmd: &Command, at: &str| walk_section(t, cmd, at, layering, &globals, path);
    match layering.root_section {
        // The tracker binary has no subcommands: its only section is its own; the rest belongs to `anomos`.
        Some(root) => match table.get(root) {
            Some(toml::Value::Table(inner)) => walk(inner, cmd, root),
            _ => Ok(()),
        },
        None => {
            for (k, v) in table {
                if !v.is_table() && !flag_anywhere(cmd, &k.replace('_', "-")) {
                    return Err(ConfigFileError::Unknown {
                        path: path.to_path_buf(),
                        message: format!("top level: no setting `{k}` in any `{}` command", cmd.get_name()),
                    });
                }
            }
            walk(table, cmd, "")
        }
    }
}

fn walk_section(
    t: &toml::Table,
    cmd: &Command,
    at: &str,
    layering: &Layering,
    globals: &[String],
    path: &Path,
) -> Result<(), ConfigFileError> {
    let unknown = |message: String| ConfigFileError::Unknown { path: path.to_path_buf(), message };
    for (k, v) in t {
        if let toml::Value::Table(inner) = v {
            let sub = if at.is_empty() {
                cmd.get_subcommands().find(|s| layering.section_of(s.get_name()) == k)
            } else {
                cmd.find_subcommand(k)
            };
            let name = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
            let Some(sub) = sub else {
                return Err(unknown(format!("[{name}] is not a subcommand of `{}`", cmd.get_name())));
            };
            walk_section(inner, sub, &name, layering, globals, path)?;
        } else if !at.is_empty() {
            let long = k.replace('_', "-");
            let known = cmd.get_arguments().any(|a| a.get_long() == Some(long.as_str()) && !a.is_hide_set())
                || globals.contains(&long);
            if !known {
                return Err(unknown(format!("[{at}]: no setting `{k}` (see `--help` of that command)")));
            }
        }
    }
    Ok(())
}

fn flag_anywhere(cmd: &Command, long: &str) -> bool {
    cmd.get_arguments().any(|a| a.get_long() == Some(long) && !a.is_hide_set())
        || cmd.get_subcommands().any(|s| flag_anywhere(s, long))
}

/// The command-line tokens that set flag `long` to `value`.
fn tokens(long: &str, action: &ArgAction, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let scalar = |v: &toml::Value| -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            toml::Value::Datetime(d) => Ok(d.to_string()),
            toml::Value::Array(_) | toml::Value::Table(_) => Err("expected a single value".into()),
        }
    };
    match (action, value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) | (ArgAction::SetFalse, toml::Value::Boolean(false)) => {
            Ok(vec![format!("--{long}").into()])
        }
        (ArgAction::SetTrue | ArgAction::SetFalse, toml::Value::Boolean(_)) => Ok(vec![]),
        (ArgAction::SetTrue | ArgAction::SetFalse, _) => Err("expected true or false".into()),
        (ArgAction::Count, toml::Value::Integer(n)) if (0..=16).contains(n) => {
            Ok((0..*n).map(|_| format!("--{long}").into()).collect())
        }
        (ArgAction::Append, toml::Value::Array(items)) => {
            items.iter().map(|v| scalar(v).map(|s| format!("--{long}={s}").into())).collect()
        }
        (_, toml::Value::Array(_)) => Err("takes one value, not a list".into()),
        (_, v) => Ok(vec![format!("--{long}={}", scalar(v)?).into()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cli() -> Command {
        Command::new("anomos")
            .arg(Arg::new("config").long("config").global(true).value_parser(clap::value_parser!(PathBuf)))
            .arg(Arg::new("log-level").long("log-level").global(true).default_value("info"))
            .subcommand(
                Command::new("peer")
                    .arg(Arg::new("listen").long("listen").default_value("127.0.0.1:8633"))
                    .arg(Arg::new("tracker").long("tracker").required(true))
                    .arg(Arg::new("serve").long("serve").action(ArgAction::Append))
                    .arg(Arg::new("allow-x").long("allow-x").action(ArgAction::SetTrue)),
            )
            .subcommand(Command::new("tracker").arg(Arg::new("listen").long("listen").default_value("127.0.0.1:7700")))
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn parse(argv: &[&str]) -> Result<ArgMatches, String> {
        let cmd = with_env(cli(), &ANOMOS);
        let args = layered_args(&cmd, argv.iter().map(OsString::from).collect(), &ANOMOS).map_err(|e| e.to_string())?;
        cmd.try_get_matches_from(args).map_err(|e| e.to_string())
    }

    fn peer_value(m: &ArgMatches, id: &str) -> Option<String> {
        m.subcommand_matches("peer").unwrap().get_one::<String>(id).cloned()
    }

    #[test]
    fn flags_beat_section_beat_top_level_beat_defaults() {
        let f = file("tracker = \"1.1.1.1:1\"\nlog-level = \"warn\"\n[peer]\nlisten = \"0.0.0.0:9\"\nserve = [\"a\", \"b\"]\nallow_x = true\n[anomos-tracker]\nlisten = \"0.0.0.0:7\"\n");
        let p = f.path().to_str().unwrap();
        let m = parse(&["anomos", "--config", p, "peer"]).unwrap();
        assert_eq!(peer_value(&m, "tracker").as_deref(), Some("1.1.1.1:1"), "top level applies to peer");
        assert_eq!(peer_value(&m, "listen").as_deref(), Some("0.0.0.0:9"), "section");
        let sm = m.subcommand_matches("peer").unwrap();
        assert_eq!(sm.get_many::<String>("serve").unwrap().cloned().collect::<Vec<_>>(), ["a", "b"]);
        assert!(sm.get_flag("allow-x"));
        assert_eq!(sm.get_one::<String>("log-level").map(String::as_str), Some("warn"));

        // The flag wins over the file.
        let m = parse(&["anomos", "peer", "--config", p, "--listen", "127.0.0.1:1"]).unwrap();
        assert_eq!(peer_value(&m, "listen").as_deref(), Some("127.0.0.1:1"));

        // The tracker subcommand reads [anomos-tracker]; the flag wins. (The environment's place between the two
        // is tested with real processes in tests/cli.rs: setting variables here would race other test threads.)
        let m = parse(&["anomos", "--config", p, "tracker"]).unwrap();
        let tm = m.subcommand_matches("tracker").unwrap();
        assert_eq!(tm.get_one::<String>("listen").map(String::as_str), Some("0.0.0.0:7"), "[anomos-tracker] section");
        let m = parse(&["anomos", "--config", p, "tracker", "--listen", "127.0.0.3:3"]).unwrap();
        let tm = m.subcommand_matches("tracker").unwrap();
        assert_eq!(tm.get_one::<String>("listen").map(String::as_str), Some("127.0.0.3:3"));

        // Without a file: defaults, and the required flag is required.
        let e = parse(&["anomos", "peer"]).unwrap_err();
        assert!(e.contains("--tracker"), "{e}");
    }

    #[test]
    fn typos_and_wrong_shapes_are_errors_naming_the_file_and_key() {
        for (text, needle) in [
            ("[peer]\nlisten_adress = \"x\"\n", "no setting `listen_adress`"),
            ("[pear]\nlisten = \"x\"\n", "[pear] is not a subcommand"),
            ("[tracker]\nlisten = \"x\"\n", "[tracker] is not a subcommand"),
            ("nonsense = 1\n", "no setting `nonsense`"),
            ("[anomos-tracker]\nlisten = \"x\"\ntracker = \"y\"\n", "[anomos-tracker]: no setting `tracker`"),
            ("[peer]\nlisten = [\"a\"]\n", "takes one value"),
            ("[peer]\nallow-x = \"yes\"\n", "expected true or false"),
            ("[peer\n", "config file"),
        ] {
            let f = file(text);
            let e = parse(&["anomos", "--config", f.path().to_str().unwrap(), "peer", "--tracker", "t"]).unwrap_err();
            assert!(e.contains(needle) && e.contains(f.path().to_str().unwrap()), "{text:?}: {e}");
        }
        let e = parse(&["anomos", "--config", "/nonexistent/anomos.toml", "peer"]).unwrap_err();
        assert!(e.contains("/nonexistent/anomos.toml"), "{e}");
    }

    #[test]
    fn file_values_are_checked_like_flags() {
        let cmd = Command::new("t")
            .arg(Arg::new("config").long("config").value_parser(clap::value_parser!(PathBuf)))
            .arg(Arg::new("port").long("port").value_parser(clap::value_parser!(u16)));
        let f = file("[anomos-tracker]\nport = 70000\n");
        let cmd = with_env(cmd, &TRACKER);
        let args = layered_args(&cmd, vec!["t".into(), "--config".into(), f.path().into()], &TRACKER).unwrap();
        let e = cmd.try_get_matches_from(args).unwrap_err().to_string();
        assert!(e.contains("70000"), "{e}");
    }

    #[test]
    fn env_names_follow_the_long_flag() {
        assert_eq!(env_name("ANOMOS_", "tracker-fp"), "ANOMOS_TRACKER_FP");
        let cmd = with_env(cli(), &ANOMOS);
        let peer = cmd.find_subcommand("peer").unwrap();
        let env = |c: &Command, id: &str| {
            c.get_arguments().find(|a| a.get_id() == id).and_then(|a| a.get_env()).map(|e| e.to_owned())
        };
        assert_eq!(env(peer, "listen"), Some("ANOMOS_LISTEN".into()));
        let tracker = cmd.find_subcommand("tracker").unwrap();
        assert_eq!(env(tracker, "listen"), Some("ANOMOS_TRACKER_LISTEN".into()));
    }
}
