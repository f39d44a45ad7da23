//! The engine's headers and blocks: `getheaders` and what answers it, `getdata` spread over the ready circuits,
//! and blocks checked and committed.

use super::*;

impl<F: FnMut(SyncEvent)> Engine<'_, F> {
    /// Sends `getheaders` with a locator from the last block we store with none missing below it (or, unrooted,
    /// for the genesis header). Not from our header tip: the answer then names the blocks we still need, and a
    /// target that sent us their headers cannot answer `notfound` for them without withholding (SPEC §9). What
    /// we already have is asked for once per circuit at most (a full answer continues from our tip). One request
    /// is outstanding per circuit at a time, so that each answer is matched with the request it answers: asked
    /// again meanwhile (an `inv`), the request is sent once the outstanding one is answered.
    pub(super) fn get_headers(&mut self, id: usize, stop: BlockHash) {
        if let Some(c) = self.circuits.get_mut(&id).filter(|c| c.headers_req.is_some()) {
            c.headers_again = true;
            return;
        }
        let (locator, stop) = {
            let s = read(self.store);
            if s.is_rooted() {
                let stored = s.hash_at(self.low_water.saturating_sub(1)).unwrap_or(s.best_tip().0);
                (s.locator_from(&stored), stop)
            } else {
                (Vec::new(), self.params.genesis_hash)
            }
        };
        self.send_getheaders(id, locator, stop);
    }

    pub(super) fn send_getheaders(&mut self, id: usize, locator_hashes: Vec<BlockHash>, stop_hash: BlockHash) {
        let from = locator_hashes.first().and_then(|h| read(self.store).height_of(h)).unwrap_or(0);
        if let Some(c) = self.circuits.get_mut(&id) {
            // (One request at a time: nothing re-arms an unanswered request's timeout.)
            c.headers_req.get_or_insert_with(Instant::now);
            c.headers_from = from;
        }
        let req = GetHeadersMessage { version: PROTOCOL_VERSION, locator_hashes, stop_hash };
        self.send(id, &Message::GetHeaders(req));
    }

    pub(super) fn on_headers(&mut self, id: usize, headers: Vec<Header>) -> Result<(), ChainError> {
        if headers.len() > MAX_HEADERS {
            return Err(ChainError::Protocol(format!("{} headers in one message", headers.len())));
        }
        let answer = match self.circuits.get_mut(&id) {
            Some(c) => c.headers_req.take().is_some(),
            None => return Ok(()),
        };
        let Some(first) = headers.first().copied() else {
            if answer {
                self.headers_ran_out(id);
            }
            return Ok(());
        };
        let rooted = read(self.store).is_rooted();
        if !rooted {
            check_genesis_header(self.params, &first)?;
            let params = self.params;
            self.headers_new +=
                write(self.store).insert_headers_checked(&[first], |_, h| check_genesis_header(params, h))? as u64;
            info!(genesis = %first.block_hash(), "learned the genesis header of {}", params.name);
            self.low_water = 0;
            self.get_headers(id, no_stop());
            return Ok(());
        }
        // An announcement that does not connect: ask for the headers between.
        if !answer && read(self.store).entry(&first.prev_blockhash).is_none() {
            let last = headers.last().map_or(first.block_hash(), Header::block_hash);
            self.get_headers(id, last);
            return Ok(());
        }
        for pair in headers.windows(2) {
            if let [a, b] = pair {
                if let Err(e) = check_linkage(a, b) {
                    // Keep what is valid before the break, then fail.
                    let upto = headers.iter().position(|h| h == b).unwrap_or(0);
                    self.accept_headers(headers.get(..upto).unwrap_or_default())?;
                    return Err(ChainError::invalid_header(b.block_hash(), e));
                }
            }
        }
        let before = read(self.store).best_tip();
        let new = self.accept_headers(&headers)?;
        // What it sent, it claims to have: the last header (stored now) and so every ancestor of it.
        if let Some(last) = headers.last() {
            let hash = last.block_hash();
            let height = read(self.store).height_of(&hash);
            if let (Some(c), Some(height)) = (self.circuits.get_mut(&id), height) {
                if c.sent_headers_to.is_none_or(|(_, h)| height >= h) {
                    c.sent_headers_to = Some((hash, height));
                }
            }
        }
        if answer {
            if headers.len() == MAX_HEADERS {
                let last = headers.last().map_or(first.block_hash(), Header::block_hash);
                // A full answer that adds nothing and ends no higher than where we asked from: honest from a peer
                // behind us or on a fork (it answers from the first locator entry it knows, and past the first
                // eleven they are sparse), so we ask again from its last header exactly. An answer to *that* which
                // again adds nothing and ends no higher is the same answer again: followed, it would be asked for
                // for ever (SPEC open issue 26).
                let (from, strict) = self.circuits.get(&id).map_or((0, false), |c| (c.headers_from, c.headers_strict));
                let stale = new == 0 && read(self.store).height_of(&last).is_none_or(|h| h <= from);
                if stale && strict {
                    return Err(ChainError::Protocol(format!(
                        "a full headers answer that adds nothing and ends below height {from}, where it was asked from"
                    )));
                }
                // From our tip when the answer is on our best chain below it (what lies between we have).
                let locator = {
                    let s = read(self.store);
                    let behind = s.is_active(&last) && s.height_of(&last) < Some(s.best_tip().1);
                    if behind && !stale {
                        s.locator()
                    } else {
                        s.locator_from(&last)
                    }
                };
                if let Some(c) = self.circuits.get_mut(&id) {
                    c.headers_strict = stale;
                }
                self.send_getheaders(id, locator, no_stop());
            } else {
                self.headers_ran_out(id);
            }
            // Asked again while this request was outstanding: now.
            let again = self
                .circuits
                .get_mut(&id)
                .is_some_and(|c| c.headers_req.is_none() && std::mem::take(&mut c.headers_again));
            if again {
                self.get_headers(id, no_stop());
            }
        }
        if read(self.store).best_tip() != before {
            if !read(self.store).is_active(&before.0) {
                // A reorg: heights at and below the old tip may hold other blocks now.
                self.low_water = 0;
            }
            self.assign();
        }
        Ok(())
    }

    /// Circuit `id` answered a `getheaders` with fewer than 2,000: its headers ran out.
    fn headers_ran_out(&mut self, id: usize) {
        if let Some(c) = self.circuits.get_mut(&id) {
            c.headers_done = true;
            self.first_done_at.get_or_insert_with(Instant::now);
        }
    }

    /// Checks and stores headers (in one write); counts the new ones, and returns how many were new.
    pub(super) fn accept_headers(&mut self, headers: &[Header]) -> Result<u64, ChainError> {
        if headers.is_empty() {
            return Ok(0);
        }
        let now = unix_now();
        let params = self.params;
        let result = write(self.store)
            .insert_headers_checked(headers, |s, h| check_header(s, params, h, now).map(|_| ()))
            .map(|n| n as u64);
        let new = match &result {
            Ok(n) => *n,
            Err(_) => 0,
        };
        self.headers_new += new;
        let n = result?;
        if n > 0 {
            self.progress(SyncPhase::Headers);
        }
        Ok(n)
    }

    pub(super) fn on_block(
        &mut self,
        id: usize,
        block: Block,
        checked: Option<Result<(), BtcError>>,
    ) -> Result<(), ChainError> {
        let hash = block.block_hash();
        let Some(c) = self.circuits.get_mut(&id) else { return Ok(()) };
        let Some(pos) = c.in_flight.iter().position(|h| *h == hash) else {
            // A block we know but did not ask this circuit for is a wrong answer to a getdata
            // (requests are answered once, in order); one we do not know is unsolicited.
            if read(self.store).entry(&hash).is_some() {
                return Err(ChainError::Protocol(format!("sent block {hash}, which we did not ask it for")));
            }
            debug!(circuit = id, %hash, "unsolicited block ignored");
            return Ok(());
        };
        c.in_flight.remove(pos);
        c.last_block = Instant::now();
        (c.probe, c.probe_answered) = (None, false);
        if c.in_flight.is_empty() {
            c.waiting_since = Instant::now();
        }
        self.in_flight.remove(&hash);
        if read(self.store).has_block(&hash) || self.storing.contains(&hash) {
            self.refetched += 1;
        }
        if let Some(Err(e)) = checked {
            return Err(ChainError::invalid_block(hash, e));
        }
        if checked.is_none() {
            check_block(&block).map_err(|e| ChainError::invalid_block(hash, e))?;
        }
        let height = read(self.store)
            .height_of(&hash)
            .ok_or_else(|| ChainError::Store(format!("block {hash} has no header")))?;
        check_block_contextual(&block, self.params, height)?;
        self.to_store.push(block);
        self.flush_blocks();
        self.assign();
        Ok(())
    }

    /// `notfound` from circuit `id`: its refused blocks go to other circuits. After [`MAX_REFUSED`] refusals, or
    /// when it has nothing left to do while a block it refused is fetched by nobody (every circuit refused it, or
    /// the others are busy), it is dropped for another (`NotFound`, broken as finished): `notfound` for everything
    /// must not stall the sync at no cost (SPEC open issue 26).
    pub(super) fn on_not_found(&mut self, id: usize, items: Vec<Inventory>) -> Result<(), ChainError> {
        let Some(c) = self.circuits.get_mut(&id) else { return Ok(()) };
        let mut last = None;
        for item in items {
            if let Inventory::Block(h) | Inventory::WitnessBlock(h) = item {
                // A block on the chain it sent us the headers of, in this conversation: it announced having it.
                // (A serving peer sends headers only of blocks it stores, SPEC §9.) Honest peers do not do that.
                if c.in_flight.contains(&h) && announced(self.store, c, &h) {
                    return Err(ChainError::Withheld("a block whose header it sent"));
                }
                if let Some(pos) = c.in_flight.iter().position(|x| *x == h) {
                    c.in_flight.remove(pos);
                    // A stall probe answered before this refusal judges nothing after it.
                    (c.probe, c.probe_answered) = (None, false);
                    c.refused.insert(h);
                    self.in_flight.remove(&h);
                    last = Some(h);
                    debug!(circuit = id, %h, "block not found there; asking others");
                }
            }
        }
        self.assign();
        let (Some(h), Some(c)) = (last, self.circuits.get(&id)) else { return Ok(()) };
        let unserved = |b: &BlockHash| {
            !self.in_flight.contains_key(b)
                && !self.storing.contains(b)
                && !self.to_store.iter().any(|x| x.block_hash() == *b)
                && !read(self.store).has_block(b)
        };
        if c.refused.len() >= MAX_REFUSED || (c.in_flight.is_empty() && c.refused.iter().any(unserved)) {
            return Err(ChainError::NotFound(h));
        }
        Ok(())
    }

    /// Starts a commit of the waiting blocks unless one is running.
    pub(super) fn flush_blocks(&mut self) {
        if self.writing || self.to_store.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_store);
        let hashes: Vec<BlockHash> = batch.iter().map(Block::block_hash).collect();
        self.storing.extend(hashes.iter().copied());
        self.writing = true;
        let store = self.store.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let result = anomos_net::rt::spawn_blocking(move || write(&store).insert_blocks(&batch))
                .await
                .unwrap_or_else(|e| Err(ChainError::Store(format!("store task: {e}"))));
            let _ = tx.send(Ev::Stored { hashes, result });
        });
    }

    /// Spreads missing best-chain blocks over ready circuits with free slots.
    pub(super) fn assign(&mut self) {
        let budget = self.opts.window.max(1) * self.circuits.len().max(1) * 2;
        if self.storing.len() + self.to_store.len() >= budget {
            return;
        }
        let free: Vec<(usize, usize)> = self
            .circuits
            .iter()
            .filter(|(_, c)| c.ready)
            .map(|(id, c)| (*id, self.opts.window.saturating_sub(c.in_flight.len())))
            .filter(|(_, n)| *n > 0)
            .collect();
        if free.is_empty() {
            return;
        }
        let want: usize = free.iter().map(|(_, n)| n).sum::<usize>() * 2;
        let candidates: Vec<BlockHash> = {
            let s = read(self.store);
            let mut first_missing = None;
            let mut out = Vec::new();
            for (height, hash) in s.missing_from(self.low_water) {
                first_missing.get_or_insert(height);
                if self.in_flight.contains_key(&hash) || self.storing.contains(&hash) {
                    continue;
                }
                if self.to_store.iter().any(|b| b.block_hash() == hash) {
                    continue;
                }
                out.push(hash);
                if out.len() >= want {
                    break;
                }
            }
            if s.is_rooted() {
                self.low_water = first_missing.unwrap_or_else(|| s.best_tip().1.saturating_add(1));
            }
            out
        };
        let mut taken: HashSet<BlockHash> = HashSet::new();
        for (id, n) in free {
            let Some(c) = self.circuits.get_mut(&id) else { continue };
            let mine: Vec<BlockHash> =
                candidates.iter().filter(|h| !taken.contains(*h) && !c.refused.contains(*h)).take(n).copied().collect();
            if mine.is_empty() {
                continue;
            }
            if c.in_flight.is_empty() {
                c.waiting_since = Instant::now();
                (c.probe, c.probe_answered) = (None, false);
            }
            c.in_flight.extend_from_slice(&mine);
            self.requested += mine.len() as u64;
            for h in &mine {
                taken.insert(*h);
                self.in_flight.insert(*h, id);
            }
            self.send(id, &Message::GetData(mine.into_iter().map(Inventory::WitnessBlock).collect()));
        }
    }
}

/// Whether circuit `c`'s target sent, in this conversation, a header at or above block `h` on `h`'s chain: it
/// claimed to have `h`.
pub(super) fn announced(store: &SharedStore, c: &Circ, h: &BlockHash) -> bool {
    c.sent_headers_to.is_some_and(|(tip, tip_height)| {
        let s = read(store);
        s.height_of(h).is_some_and(|hh| hh <= tip_height && s.ancestor(&tip, hh) == Some(*h))
    })
}
