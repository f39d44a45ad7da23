//! Failure reports: which peer a report blames, in which role, and what that costs it (SPEC §3.10 "Failure
//! reports").

use super::*;

impl Service {
    /// `Report`: act on the peer the report blames, if the reporter could know about it. At most
    /// [`REPORTS_PER_WINDOW`] reports per reporter are acted on per [`REPORT_WINDOW`].
    ///
    /// * A peer reported unreachable is probed (in the background) and avoided by everyone only if the probe
    ///   fails: a peer cannot get a neighbor that is up taken out of paths by dropping their link.
    /// * A peer blamed for a circuit it refused or broke is left out of the reporter's own paths at once and for
    ///   [`crate::graph::BLAME_LASTS`] (its announces do not end it), and out of everyone's until its next
    ///   announce once [`CORROBORATING_REPORTERS`] distinct reporters' blame is live, or when it fails the probe
    ///   that the report starts. (SPEC §3.10, open issues 6–7.)
    /// * A target blamed for misbehaving (bad data; it answered, so nothing is probed) is left out the same way,
    ///   but as a target only ([`Scope::Target`]): it may still relay, as the data it carries is protected end to
    ///   end (SPEC open issue 23).
    pub(crate) fn report(self: &Arc<Self>, reporter: Fingerprint, rep: FailureReport) -> FromTracker {
        if let Some(refused) = self.unavailable() {
            return refused;
        }
        let mut st = self.lock("report");
        let now = anomos_net::rt::now();
        let kind = rep.kind;
        self.metrics.reports.inc(ReportKind::from(&kind));
        if !Self::report_allowed(&mut st.reports, reporter, now, self.args.max_peers) {
            self.metrics.refused.inc(Refusal::ReportRate);
            debug!(reporter = %reporter.short(), ?kind, "failure report ignored: reporter over its report rate");
            return FromTracker::Ack;
        }
        let State { graph, book, .. } = &mut *st;
        let blamed = match kind {
            FailureKind::NeighborUnreachable => match rep.neighbor {
                Some(nid) => graph.other_end(&reporter, nid).ok_or("not one of the reporter's edges"),
                None => Err("no neighbor named"),
            },
            _ => match rep.circuit.map(|h| (h, book.get(h))) {
                None => Err("no circuit named"),
                Some((_, None)) => Err("unknown or forgotten circuit"),
                Some((_, Some(rec))) if rec.requester != reporter => Err("another peer's circuit"),
                Some((_, Some(rec))) => rec.blame(kind, rep.hop_tag),
            },
        };
        match blamed {
            Ok(culprit) if kind == FailureKind::NeighborUnreachable => {
                info!(
                    reporter = %reporter.short(), reported = %culprit.short(),
                    "neighbor reported unreachable; probing it"
                );
                self.probe_then_avoid(&mut st, culprit);
            }
            Ok(culprit) if kind == FailureKind::Misbehaving => {
                // The target served bad data: left out as a target only; it may still relay (SPEC §3.10).
                let reporters = st.graph.blame_in(&culprit, reporter, Scope::Target, now);
                let newly = reporters >= CORROBORATING_REPORTERS && st.graph.avoid_as_target(&culprit, now);
                info!(
                    reporter = %reporter.short(), ?kind, circuit = ?rep.circuit, blamed = %culprit.short(),
                    reporters, newly, "failure reported; a misbehaving target, left out of the reporter's targets"
                );
            }
            Ok(culprit) => {
                let reporters = st.graph.blame(&culprit, reporter, now);
                if reporters >= CORROBORATING_REPORTERS {
                    let newly = self.avoid_shared(&mut st, culprit);
                    info!(
                        reporter = %reporter.short(), ?kind, circuit = ?rep.circuit, avoided = %culprit.short(),
                        reporters, newly, "failure reported; corroborated, left out of every path"
                    );
                } else {
                    info!(
                        reporter = %reporter.short(), ?kind, circuit = ?rep.circuit, blamed = %culprit.short(),
                        reporters, "failure reported; left out of the reporter's paths, probing it"
                    );
                    self.probe_then_avoid(&mut st, culprit);
                }
            }
            Err(why) => {
                info!(
                    reporter = %reporter.short(), ?kind, neighbor = ?rep.neighbor, circuit = ?rep.circuit,
                    note = why, "failure reported (nobody marked)"
                );
            }
        }
        FromTracker::Ack
    }

    /// Probes `culprit` in the background (unless a probe of it is running) and avoids it for everyone if the
    /// probe fails. The probe holds the transport only, not the service: a tracker stopped meanwhile (its
    /// `run_on` returned or was dropped) is not kept alive by it, and the probe's outcome is then dropped. (It
    /// held the service, and with it the state database, for up to the probe's timeout after the tracker
    /// stopped: a tracker restarted in the same process within that time could not open its database. Found
    /// by the simulator, seed 1100951.)
    pub(super) fn probe_then_avoid(self: &Arc<Self>, st: &mut State, culprit: Fingerprint) {
        let Some(addr) = st.graph.get(&culprit).map(|p| p.addr) else { return };
        if !st.probing.insert(culprit) {
            return; // already being checked
        }
        let (weak, net) = (Arc::downgrade(self), self.net.clone());
        tokio::spawn(async move {
            let result = probe::check(&*net, addr, &culprit, PROBE_TIMEOUT).await;
            let Some(service) = weak.upgrade() else { return };
            let mut st = service.lock("report: probe result");
            st.probing.remove(&culprit);
            match result {
                Err(e) => {
                    let newly = service.avoid_shared(&mut st, culprit);
                    info!(
                        avoided = %culprit.short(), newly, error = %e,
                        "failure reported and confirmed: the peer failed the probe"
                    );
                }
                Ok(()) => info!(peer = %culprit.short(), "reported peer answers the probe: not avoided for everyone"),
            }
        });
    }

    /// Counts a report of `reporter` against its window; false if it is over [`REPORTS_PER_WINDOW`]. The table
    /// is bounded: past `max_peers` reporters, finished windows are dropped.
    pub(super) fn report_allowed(
        windows: &mut HashMap<Fingerprint, (Instant, u32)>,
        reporter: Fingerprint,
        now: Instant,
        max_peers: usize,
    ) -> bool {
        if windows.len() >= max_peers && !windows.contains_key(&reporter) {
            windows.retain(|_, (start, _)| now.duration_since(*start) < REPORT_WINDOW);
            if windows.len() >= max_peers {
                return false; // as many reporters in this window as the tracker holds peers: a flood
            }
        }
        let (start, n) = windows.entry(reporter).or_insert((now, 0));
        if now.duration_since(*start) >= REPORT_WINDOW {
            *start = now;
            *n = 0;
        }
        *n += 1;
        *n <= REPORTS_PER_WINDOW
    }
}
