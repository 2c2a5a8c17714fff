//! The flag layer: one clap argument per [`Key`], made from the key's
//! declaration (its flag, value syntax, default, environment variable and
//! doc become the argument and its `--help`).

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use super::{Flag, KEYS, Key};

/// The config flags given on a command line (`#[command(flatten)]` it into
/// a command's arguments).
#[derive(Debug, Clone, Default)]
pub struct ConfigFlags {
    given: Vec<(&'static Key, String)>,
}

impl ConfigFlags {
    /// Each key given as a flag, with the text it stands for.
    pub fn given(&self) -> impl Iterator<Item = (&'static Key, &str)> {
        self.given.iter().map(|(k, t)| (*k, t.as_str()))
    }
}

fn arg(k: &'static Key) -> Arg {
    let doc: Vec<&str> = k.doc.lines().map(str::trim).collect();
    let doc = doc.join(" ");
    let summary = doc
        .split_once(". ")
        .map_or(doc.as_str(), |(first, _)| first);
    let long = format!(
        "{}\n\n`{}` [default: {}] [env: {}]",
        doc,
        k.name,
        k.default,
        k.env()
    );
    let a = Arg::new(k.name)
        .long(k.flag.long())
        .help(format!("{summary} [{}]", k.name))
        .long_help(long);
    match k.flag {
        Flag::Value(_) => a.value_name(k.value).num_args(1),
        Flag::Optional(_, bare) => a
            .value_name(k.value)
            .num_args(0..=1)
            .default_missing_value(bare),
        Flag::Switch(..) => a.action(ArgAction::SetTrue),
    }
}

impl Args for ConfigFlags {
    fn augment_args(cmd: Command) -> Command {
        KEYS.iter().fold(cmd, |cmd, k| cmd.arg(arg(k)))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ConfigFlags {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = ConfigFlags::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        for k in KEYS {
            let text = match k.flag {
                Flag::Switch(_, means) => m.get_flag(k.name).then(|| means.to_string()),
                Flag::Value(_) | Flag::Optional(..) => m.get_one::<String>(k.name).cloned(),
            };
            if let Some(t) = text {
                self.given.retain(|(g, _)| g.name != k.name);
                self.given.push((k, t));
            }
        }
        Ok(())
    }
}
