//! Asynchronous Event Request completions (NVMe Base 2.0 §5.2).
//!
//! The controller completes an outstanding Asynchronous Event Request when
//! something happens; DW0 of that completion says what:
//!
//! ```text
//! bits  2:0   event type (2h Notice)
//! bits 15:8   event information (00h Namespace Attribute Changed)
//! bits 23:16  log page to read (04h Changed Namespace List)
//! ```

use super::log::LogPageId;

/// Asynchronous event type (DW0 bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AsyncEventType {
    /// 0h Error status.
    ErrorStatus = 0,
    /// 1h SMART / Health status.
    SmartHealthStatus = 1,
    /// 2h Notice.
    Notice = 2,
    /// 6h I/O command specific status.
    IoCommandSpecific = 6,
    /// 7h Vendor specific.
    VendorSpecific = 7,
}

impl AsyncEventType {
    /// The event type with this value, or `None` for a reserved one.
    pub fn from_u8(v: u8) -> Option<AsyncEventType> {
        Some(match v {
            0 => AsyncEventType::ErrorStatus,
            1 => AsyncEventType::SmartHealthStatus,
            2 => AsyncEventType::Notice,
            6 => AsyncEventType::IoCommandSpecific,
            7 => AsyncEventType::VendorSpecific,
            _ => return None,
        })
    }
}

/// DW0 of an Asynchronous Event Request completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AsyncEvent {
    /// Event type (3 bits): see [`AsyncEventType`].
    pub event_type: u8,
    /// Event information: meaning depends on the type (see the `NOTICE_*`
    /// constants).
    pub info: u8,
    /// Log page the host should read to learn more and clear the event.
    pub log_page: u8,
}

impl AsyncEvent {
    /// Notice: Namespace Attribute Changed.
    pub const NOTICE_NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
    /// Notice: Firmware Activation Starting.
    pub const NOTICE_FIRMWARE_ACTIVATION_STARTING: u8 = 0x01;
    /// Notice: Telemetry Log Changed.
    pub const NOTICE_TELEMETRY_LOG_CHANGED: u8 = 0x02;
    /// Notice: Asymmetric Namespace Access Change.
    pub const NOTICE_ANA_CHANGE: u8 = 0x03;
    /// Notice: Discovery Log Page Change (fabrics discovery controllers).
    pub const NOTICE_DISCOVERY_LOG_CHANGE: u8 = 0xf0;

    /// The event a controller raises when namespaces are added, removed or
    /// resized: a Notice pointing at the Changed Namespace List.
    pub fn namespace_attribute_changed() -> AsyncEvent {
        AsyncEvent {
            event_type: AsyncEventType::Notice as u8,
            info: AsyncEvent::NOTICE_NAMESPACE_ATTRIBUTE_CHANGED,
            log_page: LogPageId::ChangedNamespaceList.into(),
        }
    }

    /// The event type, if not reserved.
    pub fn kind(&self) -> Option<AsyncEventType> {
        AsyncEventType::from_u8(self.event_type)
    }

    /// The completion's DW0.
    pub fn to_dw0(self) -> u32 {
        u32::from(self.event_type & 0x7) | u32::from(self.info) << 8 | u32::from(self.log_page) << 16
    }

    /// Reads a completion's DW0 (reserved bits ignored).
    pub fn from_dw0(dw0: u32) -> AsyncEvent {
        AsyncEvent {
            event_type: (dw0 & 0x7) as u8,
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn namespace_change_matches_spec() {
        let e = AsyncEvent::namespace_attribute_changed();
        assert_eq!(e.to_dw0(), 0x0004_0002);
        assert_eq!(e.kind(), Some(AsyncEventType::Notice));
        assert_eq!(AsyncEvent::from_dw0(0x0004_0002), e);
        let discovery = AsyncEvent {
            event_type: 2,
            info: AsyncEvent::NOTICE_DISCOVERY_LOG_CHANGE,
            log_page: 0x70,
        };
        assert_eq!(discovery.to_dw0(), 0x0070_f002);
        assert_eq!(AsyncEvent::from_dw0(0xff00_00f8).event_type, 0);
        assert_eq!(AsyncEventType::from_u8(3), None);
        assert_eq!(
            AsyncEvent {
                event_type: 4,
                ..AsyncEvent::default()
            }
            .kind(),
            None
        );
    }

    proptest! {
        #[test]
        fn dw0_round_trip(event_type in 0u8..8, info: u8, log_page: u8) {
            let e = AsyncEvent { event_type, info, log_page };
            prop_assert_eq!(AsyncEvent::from_dw0(e.to_dw0()), e);
        }
    }
}
