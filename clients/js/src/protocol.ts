// What the gateway sends, as the SDK reads it (the README's Protocol section is the reference).

/** Where a client was in a room's stream: send it back as it came (`epoch` is an opaque string). */
export interface Position {
  offset: number;
  epoch: string;
}

/** Any message from the gateway: a `type`, and the request's `id` on an answer. */
export interface ServerMessage {
  type: string;
  id?: number | string;
  [field: string]: unknown;
}

export interface Connected {
  /** This connection's id, unique in the cluster. */
  clientId: string;
  /** Milliseconds since the Unix epoch. */
  timestamp: number;
  /** What the backend's connect proxy attached, if anything. */
  data?: unknown;
}

export interface RoomJoined {
  room: string;
  /** Connections in the room, across the cluster. */
  members: number;
  offset: number;
  epoch: string;
  /** With `since`: whether every missed message follows. */
  recovered?: boolean;
}

export interface ChatMessage {
  room: string;
  username: string;
  userId: string;
  message: string;
  /** Milliseconds since the Unix epoch. */
  timestamp: number;
  offset?: number;
}

export interface PresenceChange {
  room: string;
  username: string;
  userId: string;
  timestamp: number;
}

export interface Typing {
  room: string;
  username: string;
  userId: string;
  isTyping: boolean;
}

export interface PresenceUser {
  userId: string;
  username: string;
}

export interface PresencePage {
  room: string;
  members: number;
  users: PresenceUser[];
  next?: string;
}

/** A backend's publication to this user (`user`) or to every client (`publication`). */
export interface Publication {
  data: unknown;
  /** Milliseconds since the Unix epoch. */
  timestamp: number;
}
