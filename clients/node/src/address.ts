/**
 * Where the client connects by default, and the check that the default socket's folder is this user's own
 * (the Python client's `default_address` and `check_default_socket`). Touches only the file system.
 */

import { lstatSync, mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { status } from "@grpc/grpc-js";
import { PermissionDeniedError } from "./errors.ts";

/** TASKGUARD_ADDR, else the sidecar's own default socket: `$XDG_RUNTIME_DIR/taskguard/` or `/tmp/taskguard-<uid>/`. */
export function defaultAddress(env: NodeJS.ProcessEnv = process.env): string {
  if (env.TASKGUARD_ADDR) {
    return env.TASKGUARD_ADDR;
  }
  return `unix:${defaultFolder(env)}/taskguard.sock`;
}

function defaultFolder(env: NodeJS.ProcessEnv): string {
  return env.XDG_RUNTIME_DIR ? `${env.XDG_RUNTIME_DIR}/taskguard` : `/tmp/taskguard-${process.getuid?.() ?? 0}`;
}

/**
 * Refuse (PermissionDeniedError) to talk to the default socket when its folder is not this user's own.
 *
 * The default folder has a well-known name, so another user could make it first and put a socket of
 * theirs in it, to receive this client's calls and tokens. As the sidecar does, the client uses it only
 * when it is a real folder (not a symlink) of this user's that no one else may write; when it is missing,
 * the client makes it (0700), so that nobody else can take the name before the sidecar starts. Other
 * addresses are the caller's choice and are not checked. (The Python client's `check_default_socket`.)
 */
export function checkDefaultSocket(address: string, env: NodeJS.ProcessEnv = process.env): void {
  const folder = resolve(defaultFolder(env));
  if (!address.startsWith("unix:") || dirname(resolve(address.slice(5).replace(/^\/\//, ""))) !== folder) {
    return;
  }
  try {
    mkdirSync(folder, { mode: 0o700 }); // never follows a symlink: one at `folder` is EEXIST
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") {
      return; // its parent is missing or not writable: nobody else can make it there either
    }
  }
  const me = process.geteuid?.() ?? 0;
  const found = lstatSync(folder);
  let problem: string;
  if (!found.isDirectory()) {
    problem = "is not a folder (a symbolic link?)";
  } else if (found.uid !== me) {
    problem = `belongs to uid ${found.uid}, not to this user (uid ${me})`;
  } else if (found.mode & 0o022) {
    problem = `has mode ${(found.mode & 0o7777).toString(8).padStart(4, "0")}: other users may write in it`;
  } else {
    return;
  }
  throw new PermissionDeniedError(
    status.PERMISSION_DENIED,
    `not connecting to ${address}: the socket folder ${folder} ${problem}, so another user may be listening there; ` +
      "remove it, or set TASKGUARD_ADDR",
  );
}
