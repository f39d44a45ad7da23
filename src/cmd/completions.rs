//! `anomos completions SHELL`: prints a shell completion script for `anomos` or `anomos-tracker`.

use clap::{Args, Command, ValueEnum};
use clap_complete::Shell;

use crate::error::PeerError;

/// Which program the script completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Binary {
    /// The peer (`anomos`).
    Anomos,
    /// The tracker (`anomos-tracker`).
    AnomosTracker,
}

/// Flags of `anomos completions`.
#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
    /// The program to complete.
    #[arg(long, value_enum, default_value_t = Binary::Anomos)]
    pub binary: Binary,
}

/// The `anomos-tracker` command line: the `tracker` subcommand of `anomos` (same flags) with its global flags.
pub fn tracker_command(anomos: &Command) -> Option<Command> {
    let sub = anomos.find_subcommand("tracker")?.clone();
    let globals: Vec<_> = anomos.get_arguments().filter(|a| a.is_global_set()).cloned().collect();
    Some(globals.into_iter().fold(sub.name("anomos-tracker").bin_name("anomos-tracker"), |c, a| c.arg(a.global(false))))
}

/// Writes the completion script to stdout. `anomos` is the full `anomos` command line.
pub fn run(args: &CompletionsArgs, anomos: Command) -> Result<(), PeerError> {
    let mut cmd = match args.binary {
        Binary::Anomos => anomos,
        Binary::AnomosTracker => {
            tracker_command(&anomos).ok_or_else(|| PeerError::Config("no tracker subcommand to complete".into()))?
        }
    };
    let name = cmd.get_name().to_string();
    clap_complete::generate(args.shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}
