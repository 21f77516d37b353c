use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::BusError;
use crate::subscription::{Shared, SubscriptionId, Unsubscribe};

/// One handler's inbox sender, with its type erased so that handlers of all commands and
/// queries share one map; `type_id` guards the downcast.
pub(crate) struct Handler {
    pub(crate) id: u64,
    pub(crate) sender: Box<dyn Any + Send + Sync>,
}

pub(crate) struct Handlers {
    pub(crate) type_id: TypeId,
    pub(crate) list: Vec<Handler>,
}

/// The bus's state, shared by every [`crate::Bus`] clone. Subscriptions and inboxes hold it
/// weakly, so dropping the last `Bus` closes them.
#[derive(Default)]
pub(crate) struct Inner {
    next_id: AtomicU64,
    pub(crate) subscriptions: RwLock<Vec<Arc<Shared>>>,
    pub(crate) commands: RwLock<HashMap<&'static str, Handlers>>,
    pub(crate) queries: RwLock<HashMap<&'static str, Handlers>>,
}

impl Unsubscribe for Inner {
    fn remove_subscription(&self, id: SubscriptionId) {
        self.subscriptions.write().retain(|shared| shared.id != id);
    }
}

impl Inner {
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn remove_handler(
        map: &RwLock<HashMap<&'static str, Handlers>>,
        name: &'static str,
        id: u64,
    ) {
        let mut map = map.write();
        if let Some(handlers) = map.get_mut(name) {
            handlers.list.retain(|handler| handler.id != id);
            if handlers.list.is_empty() {
                map.remove(name);
            }
        }
    }
}

impl Handlers {
    pub(crate) fn check_type<T: 'static>(&self, name: &'static str) -> Result<(), BusError> {
        if self.type_id == TypeId::of::<T>() {
            Ok(())
        } else {
            Err(BusError::TypeMismatch { name })
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for shared in self.subscriptions.get_mut().drain(..) {
            shared.close();
        }
    }
}
