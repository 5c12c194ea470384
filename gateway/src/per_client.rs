//! Generations per client address. Connections per address are bounded where they are
//! accepted, but one HTTP/2 connection carries any number of requests, so one client could
//! still hold every generation slot and leave everyone else waiting until they time out. Each
//! address may run a share of the slots; its further requests wait for one of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Generations running per client address.
#[derive(Default)]
pub struct PerClient {
    held: Mutex<HashMap<IpAddr, usize>>,
    freed: Notify,
}

/// One generation of a client address, given back when dropped.
pub struct ClientSlot {
    table: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    /// A slot for `key`, unless it holds `limit` already.
    pub fn try_take(self: &Arc<Self>, key: IpAddr, limit: usize) -> Option<ClientSlot> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            key,
        })
    }

    /// Waits until `key` holds fewer than `limit` and takes a slot; the caller bounds the wait.
    pub async fn take(self: &Arc<Self>, key: IpAddr, limit: usize) -> ClientSlot {
        loop {
            // Registered before the check, so a slot freed in between is not missed.
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_take(key, limit) {
                return slot;
            }
            freed.await;
        }
    }

    /// Generations `key` runs now.
    pub fn held(&self, key: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&key).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        {
            let mut held = self.table.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = held.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(&self.key);
                }
            }
        }
        self.table.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn an_address_runs_its_share_and_waits_for_its_own_slot() {
        let table = Arc::new(PerClient::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = table.try_take(a, 2).unwrap();
        let _second = table.try_take(a, 2).unwrap();
        assert!(table.try_take(a, 2).is_none());
        // Another address is not held back by the first one's share.
        let _other = table.try_take(b, 2).unwrap();
        assert_eq!((table.held(a), table.held(b)), (2, 1));
        let waiter = tokio::spawn({
            let table = table.clone();
            async move { table.take(a, 2).await }
        });
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("a freed slot wakes the waiter")
            .unwrap();
        assert_eq!(table.held(a), 2);
        drop(third);
        assert_eq!(table.held(a), 1);
    }
}
