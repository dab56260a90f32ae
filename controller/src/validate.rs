//! Input rules for registry names (app, device, user) shared by the CLI and the registry.
//!
//! Owns: the accepted character sets and lengths. Must not touch: storage or I/O.
//! The app-name rule mirrors the SPA packet (`[a-z0-9._-]{1,64}`), so every app the
//! controller accepts can be named in a knock.

/// Maximum app name length; equals the packet's `MAX_APP_LEN`.
pub const MAX_APP_LEN: usize = crate::proto::MAX_APP_LEN;
/// Maximum device name length.
pub const MAX_DEVICE_NAME_LEN: usize = 64;
/// Maximum user name length.
pub const MAX_USER_LEN: usize = 128;

/// Which input a validation error is about; names the CLI argument in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    AppName,
    DeviceName,
    User,
}

impl Field {
    fn label(self) -> &'static str {
        match self {
            Field::AppName => "app name",
            Field::DeviceName => "device name",
            Field::User => "--user",
        }
    }
    fn rule(self) -> &'static str {
        match self {
            Field::AppName => {
                "use 1-64 characters from a-z 0-9 . _ - (lowercase, as in the knock packet)"
            }
            Field::DeviceName => "use 1-64 characters from A-Z a-z 0-9 . _ -",
            Field::User => "use 1-128 characters from A-Z a-z 0-9 . _ - @ +",
        }
    }
}

/// A rejected name, rendered as one line naming the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {value:?} is invalid: {}", field.label(), field.rule())]
pub struct InvalidName {
    pub field: Field,
    pub value: String,
}

fn check(
    field: Field,
    value: &str,
    max: usize,
    ok: impl Fn(u8) -> bool,
) -> Result<(), InvalidName> {
    if value.is_empty() || value.len() > max || !value.bytes().all(ok) {
        return Err(InvalidName {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// `[a-z0-9._-]{1,64}`.
pub fn app_name(value: &str) -> Result<(), InvalidName> {
    check(Field::AppName, value, MAX_APP_LEN, |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
    })
}

/// `[A-Za-z0-9._-]{1,64}`.
pub fn device_name(value: &str) -> Result<(), InvalidName> {
    check(Field::DeviceName, value, MAX_DEVICE_NAME_LEN, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
    })
}

/// `[A-Za-z0-9._@+-]{1,128}` (plain names and e-mail addresses).
pub fn user(value: &str) -> Result<(), InvalidName> {
    check(Field::User, value, MAX_USER_LEN, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b'+')
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        assert!(app_name("web-1.internal_x").is_ok());
        assert!(app_name(&"a".repeat(64)).is_ok());
        assert!(app_name(&"a".repeat(65)).is_err());
        assert!(app_name("").is_err());
        assert!(app_name("Web").is_err());
        assert!(app_name("a b").is_err());
        assert!(app_name("é").is_err());
    }

    #[test]
    fn users_and_devices() {
        assert!(user("alice@example.com").is_ok());
        assert!(user("a\nb").is_err());
        assert!(device_name("Alice-Laptop").is_ok());
        assert!(device_name("laptop/1").is_err());
        let e = device_name("").unwrap_err();
        assert!(e.to_string().starts_with("device name \"\" is invalid"));
    }
}
