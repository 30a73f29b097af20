//! The limits of single keys that the configuration does not name: the figure WeChat stated
//! for a key, or one learned from its 45011s ([`Figure`]). Each sends its key to a class of
//! its own (limit and window), made on demand and shared by every key with the same figure;
//! a key whose figure changes takes its bucket along (see [`super::limits::carry`]).
//!
//! Figures change rarely (a discovery every few minutes, a learned limit a step per window),
//! and every call reads them: the map is swapped whole on each change (copy on write), so a
//! read takes no lock, and while no key has a figure it is not even looked at.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use parking_lot::Mutex;
use wxgate_contract::LimitSource;

use super::limits::{carry, LimitClass, Limits};
use super::QuotaKey;
use crate::config::QuotaLimit;

/// A limit of one key from outside the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figure {
    /// Calls per window, and how many may leave at once.
    pub limit: QuotaLimit,
    /// The window it counts in.
    pub window: Duration,
    /// [`LimitSource::Wechat`] or [`LimitSource::Learned`].
    pub source: LimitSource,
}

/// The figures in force, by key.
pub(super) struct KeyFigures<C: Clock> {
    map: ArcSwap<HashMap<QuotaKey, Figured<C>>>,
    /// How many keys have a figure: while none has, calls do not look.
    count: AtomicUsize,
    /// Serialises changes (a read never waits on it).
    registry: Mutex<Registry<C>>,
}

/// A key's figure and the class it sends the key to.
pub(super) struct Figured<C: Clock> {
    pub(super) figure: Figure,
    pub(super) class: Arc<LimitClass<C>>,
}

impl<C: Clock> Clone for Figured<C> {
    fn clone(&self) -> Self {
        Figured {
            figure: self.figure,
            class: self.class.clone(),
        }
    }
}

/// The classes of figures, one per (limit, window), kept while a key uses them.
struct Registry<C: Clock> {
    classes: HashMap<(QuotaLimit, Duration), Weak<LimitClass<C>>>,
    margin: Duration,
}

impl<C: Clock + Clone> Registry<C> {
    fn class(&mut self, figure: &Figure, clock: &C) -> Arc<LimitClass<C>> {
        let id = (figure.limit, figure.window);
        if let Some(class) = self.classes.get(&id).and_then(Weak::upgrade) {
            return class;
        }
        let class = Arc::new(LimitClass::new(
            figure.limit,
            figure.window,
            self.margin,
            clock,
        ));
        self.classes.insert(id, Arc::downgrade(&class));
        class
    }
}

impl<C: Clock + Clone> KeyFigures<C> {
    /// No figures, classes to be made with `margin`.
    pub(super) fn new(margin: Duration) -> KeyFigures<C> {
        KeyFigures {
            map: ArcSwap::from_pointee(HashMap::new()),
            count: AtomicUsize::new(0),
            registry: Mutex::new(Registry {
                classes: HashMap::new(),
                margin,
            }),
        }
    }

    /// Calls `f` with `key`'s figure, if it has one. No lock, no allocation; one atomic load
    /// while no key has a figure.
    #[inline]
    pub(super) fn with<R>(&self, key: &QuotaKey, f: impl FnOnce(Option<&Figured<C>>) -> R) -> R {
        if self.count.load(Ordering::Acquire) == 0 {
            return f(None);
        }
        let map = self.map.load();
        f(map.get(key))
    }

    /// `key`'s figure, if it has one.
    pub(super) fn get(&self, key: &QuotaKey) -> Option<Figure> {
        self.with(key, |figured| figured.map(|figured| figured.figure))
    }

    /// Gives `key` the figure `figure` (`None`: none, back to the configuration's), moving
    /// its bucket to the class that now applies. Whether the configuration names the key
    /// (then it wins, and the bucket stays) is read in `limits`.
    pub(super) fn set(
        &self,
        key: &QuotaKey,
        figure: Option<Figure>,
        limits: &Limits<C>,
        clock: &C,
    ) -> bool {
        let mut registry = self.registry.lock();
        let map = self.map.load_full();
        let current = map.get(key);
        if current.map(|figured| figured.figure) == figure {
            return false;
        }
        let class = figure.map(|figure| registry.class(&figure, clock));
        let mut next = (*map).clone();
        match (figure, &class) {
            (Some(figure), Some(class)) => {
                next.insert(
                    *key,
                    Figured {
                        figure,
                        class: class.clone(),
                    },
                );
            }
            _ => {
                next.remove(key);
            }
        }
        let count = next.len();
        self.map.store(Arc::new(next));
        self.count.store(count, Ordering::Release);
        if limits.named(key).is_none() {
            let from = current.map_or(limits.default_class(), |figured| &figured.class);
            let to = class.as_deref().unwrap_or(limits.default_class());
            carry(key, from, to, clock);
        }
        registry.classes.retain(|_, class| class.strong_count() > 0);
        true
    }

    /// The classes of every figure, each once.
    pub(super) fn classes(&self) -> Vec<Arc<LimitClass<C>>> {
        let map = self.map.load();
        let mut classes: Vec<Arc<LimitClass<C>>> = Vec::new();
        for figured in map.values() {
            if !classes
                .iter()
                .any(|class| Arc::ptr_eq(class, &figured.class))
            {
                classes.push(figured.class.clone());
            }
        }
        classes
    }

    /// Every key with a figure, and its figure.
    pub(super) fn all(&self) -> Vec<(QuotaKey, Figure)> {
        let map = self.map.load();
        map.iter()
            .map(|(key, figured)| (*key, figured.figure))
            .collect()
    }

    /// Makes every figure's class again with `margin` (a reload changed it); the classes the
    /// keys had, for their buckets to be carried over.
    pub(super) fn remake(&self, margin: Duration, clock: &C) -> Vec<Arc<LimitClass<C>>> {
        let mut registry = self.registry.lock();
        let old = self.classes();
        if registry.margin == margin {
            return Vec::new();
        }
        registry.margin = margin;
        registry.classes.clear();
        let map = self.map.load_full();
        let next: HashMap<QuotaKey, Figured<C>> = map
            .iter()
            .map(|(key, figured)| {
                let class = registry.class(&figured.figure, clock);
                (
                    *key,
                    Figured {
                        figure: figured.figure,
                        class,
                    },
                )
            })
            .collect();
        self.map.store(Arc::new(next));
        old
    }
}
