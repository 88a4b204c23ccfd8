/**
 * Notices edits of the config dir made behind egressctl's back (an editor, configuration
 * management): inotify on the config dir and services.d (fs.watch), debounced, so a change is
 * looked at within about a second. Where inotify is not available it polls every 2 s.
 */
import { watch, type FSWatcher } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";

const DEBOUNCE_MS = 300;
const POLL_MS = 2000;

/** Calls `onChange` (never twice at once) after files under `configDir` change. */
export function watchConfig(
  configDir: string,
  onChange: () => Promise<void>,
  log: Logger,
): { close(): void } {
  const watchers = new Map<string, FSWatcher>();
  let timer: NodeJS.Timeout | null = null;
  let poll: NodeJS.Timeout | null = null;
  let running: Promise<void> | null = null;
  let again = false;
  let closed = false;

  const run = () => {
    if (running) {
      again = true;
      return;
    }
    running = onChange()
      .catch((err: unknown) => log.warn({ err: String(err) }, "looking at config changes failed"))
      .finally(() => {
        running = null;
        if (again && !closed) {
          again = false;
          run();
        }
      });
  };
  const soon = () => {
    if (closed) return;
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = null;
      arm();
      run();
    }, DEBOUNCE_MS);
  };
  const arm = () => {
    for (const dir of [configDir, join(configDir, "services.d")]) {
      if (watchers.has(dir) || closed) continue;
      try {
        const w = watch(dir, { persistent: false }, soon);
        w.on("error", () => {
          w.close();
          watchers.delete(dir);
        });
        watchers.set(dir, w);
      } catch {
        // Not there yet (services.d is created by the first registration): the config dir's
        // watcher re-arms this one when it appears; without inotify, poll.
        if (!poll && dir === configDir) poll = setInterval(run, POLL_MS);
      }
    }
  };
  arm();
  return {
    close() {
      closed = true;
      if (timer) clearTimeout(timer);
      if (poll) clearInterval(poll);
      for (const w of watchers.values()) w.close();
    },
  };
}
