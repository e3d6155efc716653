//! Configuration problems, each naming the field it is about.
//!
//! Every crate validates its own settings and reports **every** problem at once, each
//! with the dotted path of its field as the user wrote it (`failure_rate.threshold`,
//! `clusters.api.breaker.min_calls`) and, where the settings came from a file, the
//! line. A caller that embeds a crate's settings under its own table prefixes the
//! paths with [`ConfigErrors::under`].

use std::fmt;

/// One problem with a configuration: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `failure_rate.threshold`.
    pub field: String,
    /// What is wrong and what would be right.
    pub problem: String,
    /// The line of the file the field is on, when it came from one (1-based).
    pub line: Option<usize>,
}

impl ConfigError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
            line: None,
        }
    }

    /// The same problem, located on `line` of the file.
    pub fn at_line(mut self, line: usize) -> Self {
        self.line = Some(line);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.field, self.problem),
            None => write!(f, "{}: {}", self.field, self.problem),
        }
    }
}

/// Every problem found in a configuration, in the order found.
///
/// Displayed one problem per line, so a command-line tool can print it as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// `Ok` when `errors` is empty, else every one of them.
    pub fn result(errors: Vec<ConfigError>) -> Result<(), ConfigErrors> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// One problem.
    pub fn one(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError::new(field, problem)])
    }

    /// The same problems with every field path prefixed by `prefix` and a dot
    /// (`threshold` under `breaker` is `breaker.threshold`).
    pub fn under(mut self, prefix: &str) -> Self {
        for e in &mut self.0 {
            e.field = format!("{prefix}.{}", e.field);
        }
        self
    }

    /// The fields with problems, in the order found.
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.field.as_str()).collect()
    }

    /// The problems.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn each_problem_is_a_line_naming_its_field() {
        let errors = ConfigErrors(vec![
            ConfigError::new("threshold", "must be in (0, 1]"),
            ConfigError::new("min_calls", "must be at least 1").at_line(7),
        ])
        .under("breaker");
        assert_eq!(
            errors.to_string(),
            "breaker.threshold: must be in (0, 1]\nbreaker.min_calls (line 7): must be at least 1"
        );
        assert_eq!(errors.fields(), ["breaker.threshold", "breaker.min_calls"]);
        assert!(ConfigErrors::result(Vec::new()).is_ok());
    }
}
