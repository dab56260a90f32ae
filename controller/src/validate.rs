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
    /// A user named as the command's argument (`user add NAME`).
    UserName,
    GroupName,
    /// A gateway name (`gateway add NAME`, `hello.name`).
    GatewayName,
}

impl Field {
    fn label(self) -> &'static str {
        match self {
            Field::AppName => "app name",
            Field::DeviceName => "device name",
            Field::User => "--user",
            Field::UserName => "user name",
            Field::GroupName => "group name",
            Field::GatewayName => "gateway name",
        }
    }
    fn rule(self) -> &'static str {
        match self {
            Field::AppName => {
                "use 1-64 characters from a-z 0-9 . _ - (lowercase, as in the knock packet)"
            }
            Field::DeviceName => "use 1-64 characters from A-Z a-z 0-9 . _ -",
            Field::User | Field::UserName => "use 1-128 characters from A-Z a-z 0-9 . _ - @ +",
            Field::GroupName => "use 1-128 characters from A-Z a-z 0-9 . _ -",
            Field::GatewayName => "use 1-64 characters from A-Z a-z 0-9 . _ -",
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

/// A user named as a command argument: same rule as [`user`], labelled "user name".
pub fn user_name(value: &str) -> Result<(), InvalidName> {
    user(value).map_err(|e| InvalidName {
        field: Field::UserName,
        value: e.value,
    })
}

/// `[A-Za-z0-9._-]{1,128}`.
pub fn group_name(value: &str) -> Result<(), InvalidName> {
    check(Field::GroupName, value, MAX_USER_LEN, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
    })
}

/// `[A-Za-z0-9._-]{1,64}` (no `:`: `session kill GATEWAY:ID` splits on it).
pub fn gateway_name(value: &str) -> Result<(), InvalidName> {
    check(Field::GatewayName, value, MAX_DEVICE_NAME_LEN, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
    })
}

/// A rejected forward target, rendered as one line naming `--forward` and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--forward {value:?} is invalid: {why}; use IP:PORT or [IPv6]:PORT of the internal app, e.g. 10.0.0.5:80 or [fd00::5]:80")]
pub struct InvalidForward {
    pub value: String,
    pub why: &'static str,
}

/// Parses and checks a forward target: an IPv4 or IPv6 literal (no host names: the
/// gateway must not resolve names on the knock path) with a port 1-65535, unicast and
/// not loopback (a DNAT to loopback is dropped by the kernel), IPv4 written as IPv4.
pub fn forward(value: &str) -> Result<std::net::SocketAddr, InvalidForward> {
    let bad = |why| InvalidForward {
        value: value.to_owned(),
        why,
    };
    let addr: std::net::SocketAddr = value
        .parse()
        .map_err(|_| bad("not an IP literal with a port"))?;
    let ip = addr.ip();
    if addr.port() == 0 {
        return Err(bad("port 0"));
    }
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(bad("not a unicast, non-loopback address"));
    }
    if let std::net::IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return Err(bad("not a unicast, non-loopback address"));
        }
    }
    if let std::net::IpAddr::V6(v6) = ip {
        if v6.to_ipv4_mapped().is_some() {
            return Err(bad("an IPv4-mapped IPv6 address"));
        }
    }
    if let std::net::SocketAddr::V6(v6) = addr {
        if v6.scope_id() != 0 || v6.flowinfo() != 0 {
            return Err(bad("a scoped IPv6 address"));
        }
    }
    Ok(addr)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn forward_targets() {
        assert_eq!(forward("10.0.0.5:80").unwrap().to_string(), "10.0.0.5:80");
        assert_eq!(
            forward("[fd00::5]:8080").unwrap().to_string(),
            "[fd00::5]:8080"
        );
        for bad in [
            "",
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:65536",
            "db.internal:80",
            "0.0.0.0:80",
            "127.0.0.1:80",
            "[::1]:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::ffff:10.0.0.5]:80",
            "[fe80::1%2]:80",
            "10.0.0.5:80 ",
        ] {
            let e = forward(bad).unwrap_err();
            let text = e.to_string();
            assert!(text.starts_with("--forward "), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }

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
