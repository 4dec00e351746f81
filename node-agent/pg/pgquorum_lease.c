/*
 * pgquorum_lease: the primary lease, checked by Postgres itself at commit time.
 *
 * The agent writes the node's lease deadline to a file (CLOCK_BOOTTIME
 * nanoseconds, their bitwise complement as a check, and the boot id; see the
 * agent's guard.rs); the lease guard kills a primary whose deadline has passed, within
 * 10 ms. That leaves a gap when the whole host was frozen (a VM pause, SIGSTOP
 * of everything): on thawing, backends and the guard run again together, and
 * a backend may acknowledge writes before the guard's kill lands. This library
 * closes it inside Postgres:
 *
 * - before a transaction that wrote (has a transaction id) commits, the lease
 *   is read; once it has run out, or cannot be read, the commit fails with
 *   SQLSTATE 25006 (read_only_sql_transaction), as a write on a standby does;
 * - after the commit record is flushed (and a synchronous standby confirmed
 *   it) but before the client is told, the lease is read again; if it ran out
 *   meanwhile the backend kills itself with SIGKILL: the client sees the
 *   connection end, never an acknowledgement, and the postmaster ends every
 *   other backend (as after any crash) until the guard stops it.
 *
 * - COMMIT PREPARED and ROLLBACK PREPARED (which run in a transaction with no
 *   transaction id of their own) are checked the same way, before and after.
 *
 * The lease file also names the boot it was written in
 * (/proc/sys/kernel/random/boot_id): CLOCK_BOOTTIME starts again at zero on a
 * reboot, so a deadline from an earlier boot is no lease.
 *
 * What is left is the stretch between that second check and the reply leaving
 * the socket (cleanup of the transaction, and in a multi-statement query the
 * statements after it): a write in flight then is acknowledged with its
 * commit dated before the lease ended, as a reply delayed by the network
 * would be. Not covered: WAL written with no transaction at all
 * (pg_logical_emit_message(false, ...)), which carries no table data.
 *
 * Loaded with shared_preload_libraries (the agent sets it and
 * pgquorum.lease_file); with pgquorum.lease_file empty it checks nothing.
 */
#include "postgres.h"

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "access/transam.h"
#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static char *lease_file = NULL;

/* This boot's id, read once when the library is loaded (empty: unknown, no lease). */
static char boot_id[64] = "";

static ProcessUtility_hook_type prev_process_utility = NULL;

/* Whether the transaction being committed wrote, as seen before its commit. */
static bool committing_a_write = false;

/*
 * Parses one unsigned decimal number at *pos (after blanks), as Rust's u64 parse
 * does: digits only, no overflow. Advances *pos past it.
 */
static bool
parse_u64(const char **pos, unsigned long long *out)
{
	const char *p = *pos;
	unsigned long long v = 0;

	while (*p == ' ' || *p == '\t' || *p == '\n')
		p++;
	if (*p < '0' || *p > '9')
		return false;
	for (; *p >= '0' && *p <= '9'; p++)
	{
		unsigned int digit = (unsigned int) (*p - '0');

		if (v > (ULLONG_MAX - digit) / 10)
			return false;
		v = v * 10 + digit;
	}
	*pos = p;
	*out = v;
	return true;
}

/* Whether the lease file holds a deadline that has not passed. */
static bool
lease_valid(void)
{
	char		buf[160];
	int			fd;
	ssize_t		n;
	unsigned long long deadline;
	unsigned long long check;
	struct timespec now;
	unsigned long long now_ns;
	const char *pos;

	fd = open(lease_file, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	pos = buf;
	if (!parse_u64(&pos, &deadline) || !parse_u64(&pos, &check))
		return false;
	if (deadline == 0 || check != ~deadline)
		return false;
	while (*pos == ' ')
		pos++;
	if (boot_id[0] == '\0' || strncmp(pos, boot_id, strlen(boot_id)) != 0)
		return false;
	pos += strlen(boot_id);
	if (*pos != '\n' && *pos != '\0')
		return false;
	if (clock_gettime(CLOCK_BOOTTIME, &now) != 0)
		return false;
	now_ns = (unsigned long long) now.tv_sec * 1000000000ULL + (unsigned long long) now.tv_nsec;
	return now_ns < deadline;
}

static void
lease_xact_callback(XactEvent event, void *arg)
{
	if (lease_file == NULL || lease_file[0] == '\0')
		return;
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			committing_a_write = TransactionIdIsValid(GetTopTransactionIdIfAny());
			if (committing_a_write && !lease_valid())
			{
				committing_a_write = false;
				ereport(ERROR,
						(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
						 errmsg("cannot commit: this server's primary lease has run out"),
						 errdetail("pgquorum.lease_file \"%s\" holds no deadline in the future.", lease_file),
						 errhint("The coordinators may be promoting another server; connect through the router.")));
			}
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PREPARE:
			/* NOTIFY assigns a transaction id only after PRE_COMMIT: look again. */
			if ((committing_a_write || TransactionIdIsValid(GetTopTransactionIdIfAny()))
				&& !lease_valid())
			{
				/* Committed here, but not to be acknowledged: end without a reply. */
				kill(getpid(), SIGKILL);
			}
			committing_a_write = false;
			break;
		case XACT_EVENT_ABORT:
			committing_a_write = false;
			break;
		default:
			break;
	}
}

/* Whether a utility statement finishes a prepared transaction. */
static bool
finishes_prepared(Node *stmt)
{
	TransactionStmt *t;

	if (!IsA(stmt, TransactionStmt))
		return false;
	t = (TransactionStmt *) stmt;
	return t->kind == TRANS_STMT_COMMIT_PREPARED || t->kind == TRANS_STMT_ROLLBACK_PREPARED;
}

static void
lease_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					  ProcessUtilityContext context, ParamListInfo params,
					  QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	bool		checked = lease_file != NULL && lease_file[0] != '\0'
		&& finishes_prepared(pstmt->utilityStmt);

	if (checked && !lease_valid())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("cannot finish a prepared transaction: this server's primary lease has run out")));
	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	if (checked && !lease_valid())
		kill(getpid(), SIGKILL);
}

/* Reads this boot's id into boot_id (left empty when it cannot be read). */
static void
read_boot_id(void)
{
	int			fd;
	ssize_t		n;
	char	   *nl;

	fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	n = read(fd, boot_id, sizeof(boot_id) - 1);
	close(fd);
	if (n <= 0)
	{
		boot_id[0] = '\0';
		return;
	}
	boot_id[n] = '\0';
	nl = strchr(boot_id, '\n');
	if (nl)
		*nl = '\0';
}

void
_PG_init(void)
{
	read_boot_id();
	DefineCustomStringVariable("pgquorum.lease_file",
							   "File holding this server's primary lease deadline (written by pgquorum-agent).",
							   "Empty: no commit-time lease check.",
							   &lease_file,
							   "",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);
	MarkGUCPrefixReserved("pgquorum");
	RegisterXactCallback(lease_xact_callback, NULL);
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = lease_process_utility;
}
